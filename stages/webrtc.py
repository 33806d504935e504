"""The WebRTC sink: a live session's face and voice as aiortc tracks paced by its clock, encoders set for rendered
faces, and the peer connection that carries them (and brings the browser's microphone in). It knows no HTTP:
`server.py` answers the requests and opens these peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import time
import weakref
from collections import deque
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Literal, cast

import av
import cv2
import numpy as np
import numpy.typing as npt
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpCodecParameters,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.codecs.base import Encoder
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.exceptions import OperationError
from aiortc.mediastreams import MediaStreamError
from av.frame import Frame

from stream.clock import RTP_VIDEO_CLOCK_HZ, FrameClock

# aiortc makes an encoder per sender without saying the session's frame rate: the encoders plan rate control and key
# frames for the presets' 25 fps (frames carry their own timestamps, so another rate only shifts those plans).
ENCODER_PLANNED_FPS = 25
KEYFRAME_INTERVAL_S = 10   # a receiver that missed a keyframe request recovers within this

if TYPE_CHECKING:
    from stages.live import LiveSession




class BadOffer(ValueError):
    """An SDP offer aiortc cannot negotiate; the message says why."""


# ------------------------------------------------------------------------------------------------------- peer


_PEER_CONNECTIONS: weakref.WeakSet[RTCPeerConnection] = weakref.WeakSet()


def live_peer_connections() -> int:
    """Peer connections made here and not closed: what a leaked session shows in."""
    return sum(pc.connectionState != "closed" for pc in list(_PEER_CONNECTIONS))


class WebRtcPeer:
    """One peer connection of a live session: its face and voice out on one video and one audio track, the peer's
    microphone (if it sends one) spoken into the session; what the peer reports of our streams. `close()` ends it."""

    def __init__(self, live: LiveSession, *, video_codec: str, ice_servers: Sequence[str], name: str) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(url) for url in ice_servers]))
        _PEER_CONNECTIONS.add(self.pc)
        audio_sender = self.pc.addTrack(PacedAudioTrack(live))
        self.video = PacedVideoTrack(live)
        video_sender = self.pc.addTrack(self.video)
        _prefer(self.pc, video_sender, video_codec, only=False)
        _prefer(self.pc, audio_sender, "opus", only=True)
        self.tasks: set[asyncio.Task[None]] = set()
        self.packets_lost = 0           # what the peer reports (RTCP receiver reports)
        self.round_trip_s = 0.0

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                task = asyncio.ensure_future(_listen(live, track))
                task.set_name(f"microphone-{name}")
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    @property
    def state(self) -> str:
        """The connection's state: new, connecting, connected, failed or closed."""
        return self.pc.connectionState

    async def answer(self, offer_sdp: str, host: str) -> RTCSessionDescription:
        """The answer to an offer, remote candidates kept as `_reachable_candidates` says for a server bound to
        `host`; `BadOffer` when aiortc cannot negotiate it."""
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(_reachable_candidates(offer_sdp, host), "offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except (ValueError, KeyError, IndexError, AttributeError, OperationError) as error:
            raise BadOffer(f"cannot negotiate this offer: {error}") from None
        return self.pc.localDescription

    async def read_stats(self) -> int:
        """RTP and RTCP packets the peer sent so far (its receiver reports keep coming while it watches); notes
        what its reports say of our streams: packets lost, round-trip time."""
        report = (await self.pc.getStats()).values()
        remote = [stats for stats in report if stats.type == "remote-inbound-rtp"]
        self.packets_lost = sum(stats.packetsLost or 0 for stats in remote)
        self.round_trip_s = max((stats.roundTripTime or 0.0 for stats in remote), default=0.0)
        return sum(getattr(stats, "packetsReceived", 0) or 0 for stats in report if stats.type == "transport")

    async def close(self) -> None:
        others = [task for task in self.tasks if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self.pc.close()


async def _listen(live: LiveSession, track: MediaStreamTrack) -> None:
    """The browser's microphone: decoded Opus folded to mono at its own rate and spoken as it comes."""
    to_mono = av.AudioResampler("s16", "mono")
    with contextlib.suppress(MediaStreamError):
        while True:
            # aiortc types every track's recv() as Frame | Packet; a remote audio track gives AudioFrames.
            frame = cast(av.AudioFrame, await track.recv())
            for out in to_mono.resample(frame):
                live.push(out.to_ndarray().reshape(-1), out.sample_rate)


# ------------------------------------------------------------------------------------------------------- tracks


class PacedVideoTrack(MediaStreamTrack):
    """The face, one frame per slot at the session clock's deadlines: pts +3600 at 90 kHz per frame at 25 fps."""

    kind = "video"

    def __init__(self, live: LiveSession) -> None:
        super().__init__()
        self.live = live
        self.slot = 0
        self.slots = FrameClock(live.timing.fps, RTP_VIDEO_CLOCK_HZ)   # slot -> pts
        self.sent_at: deque[float] = deque(maxlen=int(live.timing.fps) + 1)   # the last second's frames

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        image, _ = await self.live.next_video(self.slot)
        # wrapped, not copied (8 us against 130 on the event loop); each frame is a fresh array nobody writes to
        frame = av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(image), format="bgr24")
        frame.pts = self.slots.start(self.slot)
        frame.time_base = Fraction(1, RTP_VIDEO_CLOCK_HZ)
        self.slot += 1
        self.sent_at.append(time.monotonic())
        return frame

    @property
    def fps(self) -> float:
        """Frames handed to the encoder per second, over the last second."""
        span = self.sent_at[-1] - self.sent_at[0] if len(self.sent_at) > 1 else 0.0
        return (len(self.sent_at) - 1) / span if span else 0.0


class PacedAudioTrack(MediaStreamTrack):
    """The voice, 20 ms at 48 kHz per packet at the same clock's deadlines, silence when nobody speaks.

    Encoded here, as mono Opus: under 0.2 ms a packet, less than what aiortc spends on a raw frame (a thread hop,
    resampling to stereo, and a level meter in pure Python: 0.4 ms of it on the event loop). The peer must accept
    Opus, which `WebRtcPeer` makes the only audio codec.
    """

    kind = "audio"
    BITRATE = 48_000   # bit/s: ample for one voice

    def __init__(self, live: LiveSession) -> None:
        super().__init__()
        self.live = live
        self.block = 0
        rate = live.timing.rate_hz
        self.opus = av.CodecContext.create("libopus", "w")
        self.opus.format, self.opus.layout, self.opus.sample_rate = "s16", "mono", rate
        self.opus.bit_rate = self.BITRATE
        self.opus.time_base = Fraction(1, rate)
        # complexity 5 of 10: 0.18 ms a packet of speech against 0.27, on the event loop; no audible loss for a voice
        self.opus.options = {"application": "voip", "compression_level": "5"}

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        samples = await self.live.next_audio(self.block)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = self.live.timing.rate_hz
        frame.pts = self.block * len(samples)
        (packet,) = self.opus.encode(frame)  # one 20 ms frame in, one packet out
        packet.pts, packet.time_base = frame.pts, self.opus.time_base
        self.block += 1
        return packet


# ------------------------------------------------------------------------------------------------------- encoders


def _i420(frame: av.VideoFrame) -> av.VideoFrame:
    """The frame as yuv420p, converted by OpenCV (about 3x cheaper than the swscale call aiortc would make)."""
    if frame.format.name == "yuv420p":
        return frame
    # uint8 in, uint8 out: cv2's stubs type the result as any integer or float array, which PyAV does not take.
    i420 = cast(npt.NDArray[np.uint8], cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_BGR2YUV_I420))
    converted = av.VideoFrame.from_ndarray(i420, format="yuv420p")
    converted.pts, converted.time_base = frame.pts, frame.time_base
    return converted


def _needs_new_context(codec: av.VideoCodecContext | None, frame: av.VideoFrame, bitrate: int) -> bool:
    """aiortc's own rule for reopening an encoder: a new size, or the bitrate off by more than 10 %."""
    # bit_rate is None only before a context is given one, and `_video_context` always does.
    return (codec is None or codec.bit_rate is None or (codec.width, codec.height) != (frame.width, frame.height)
            or abs(bitrate - codec.bit_rate) / codec.bit_rate > 0.1)


def _video_context(name: Literal["libvpx", "libx264"], frame: av.VideoFrame, bitrate: int,
                   options: dict[str, str]) -> av.VideoCodecContext:
    codec = av.CodecContext.create(name, "w")  # a literal video codec name: PyAV's stubs give a VideoCodecContext
    codec.width, codec.height = frame.width, frame.height
    codec.bit_rate = bitrate
    codec.pix_fmt = "yuv420p"
    codec.time_base = Fraction(1, RTP_VIDEO_CLOCK_HZ)
    codec.thread_count = 1   # one thread per encoder: libvpx with two collapses on a busy core (cpu-limits.md)
    codec.options = options
    return codec


class LiveVp8Encoder(Vp8Encoder):
    """aiortc's VP8 packetiser over an encoder set for rendered faces: libvpx's fastest real-time speed and no
    denoiser (rendered frames carry no sensor noise): 1.2-1.6 ms a 512² frame against 2.9 with aiortc's settings,
    and a higher PSNR at the same bitrate."""

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        assert isinstance(frame, av.VideoFrame)  # as aiortc's own encode asserts: a video sender sends video
        frame = _i420(frame)
        bitrate = self.target_bitrate
        if _needs_new_context(self.codec, frame, bitrate):
            self.codec = _video_context("libvpx", frame, bitrate, {
                "deadline": "realtime", "cpu-used": "16", "noise-sensitivity": "0", "lag-in-frames": "0",
                "static-thresh": "1",
                # constant bitrate with a one-second buffer: what congestion control asks for is what goes out
                "minrate": str(bitrate), "maxrate": str(bitrate), "bufsize": str(bitrate),
                "undershoot-pct": "100", "overshoot-pct": "15"})
            self.codec.gop_size = KEYFRAME_INTERVAL_S * ENCODER_PLANNED_FPS
        return super().encode(frame, force_keyframe)


class LiveH264Encoder(H264Encoder):
    """aiortc's H.264 packetiser over x264 at its ultrafast preset (aiortc's own runs the medium preset: 3.3x the
    CPU per frame, cpu-limits.md), zero latency, Baseline at level 3.1 as aiortc advertises."""

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        assert isinstance(frame, av.VideoFrame)  # as aiortc's own encode asserts: a video sender sends video
        frame = _i420(frame)
        if _needs_new_context(self.codec, frame, self.target_bitrate):
            self.buffer_data, self.buffer_pts = b"", None
            self.codec = _video_context("libx264", frame, self.target_bitrate,
                                        {"preset": "ultrafast", "tune": "zerolatency", "level": "31"})
            self.codec.framerate = Fraction(ENCODER_PLANNED_FPS)
            self.codec.profile = "Baseline"
        return super().encode(frame, force_keyframe)


def use_live_encoders() -> None:
    """Make aiortc's senders encode VP8 and H.264 with the encoders above (other codecs as before). Done when the
    server starts, never at import."""
    import aiortc.rtcrtpsender

    stock = aiortc.rtcrtpsender.get_encoder
    if getattr(stock, "live", False):
        return
    live_encoders = {"video/vp8": LiveVp8Encoder, "video/h264": LiveH264Encoder}

    def get_encoder(codec: RTCRtpCodecParameters) -> Encoder:
        make = live_encoders.get(codec.mimeType.lower())
        return make() if make is not None else stock(codec)

    get_encoder.live = True  # type: ignore[attr-defined]  # a mark on the function, so a second call is a no-op
    aiortc.rtcrtpsender.get_encoder = get_encoder


# ------------------------------------------------------------------------------------------------------- codecs and ICE


def _prefer(pc: RTCPeerConnection, sender: RTCRtpSender, codec: str, *, only: bool) -> None:
    """Put `codec` first among the sender's codecs (before the offer is read: aiortc settles them then), the others
    kept as fallbacks unless `only`."""
    capabilities = RTCRtpSender.getCapabilities(sender.kind).codecs
    first = [c for c in capabilities if c.mimeType.lower() == f"{sender.kind}/{codec.lower()}"]
    rest = [] if only else [c for c in capabilities if c not in first]
    for transceiver in pc.getTransceivers():
        if transceiver.sender is sender:
            transceiver.setCodecPreferences(first + rest)


_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) ", re.IGNORECASE)


def _reachable_candidates(sdp: str, host: str) -> str:
    """A server bound to loopback talks to this machine only: remote candidates on other machines are dropped. Any
    address of this machine is kept (a local aiortc client offers its interfaces' addresses, never loopback, and
    127.0.0.1 reaches them), and so are mDNS names (a browser's). Any other bind keeps every candidate, and a peer
    that offers none still connects by its checks (peer-reflexive candidates)."""
    if not is_loopback(host):
        return sdp
    kept = [line for line in sdp.splitlines()
            if not (match := _CANDIDATE.match(line)) or _on_this_machine(match.group(1))]
    return "\r\n".join(kept) + "\r\n"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _on_this_machine(address: str) -> bool:
    """Whether `address` is one of this machine's (it can be bound), or an mDNS name (resolved later by aioice)."""
    if address.endswith(".local"):
        return True
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
        return True
    except (ValueError, OSError):
        return False


def restrict_ice_to(host: str) -> None:
    """Offer host candidates on the bound address only: aioice otherwise offers every interface's address (and
    skips loopback). Done when the server starts, never at import."""
    if host in ("0.0.0.0", "::", ""):
        return
    import aioice.ice

    # The listener's family (IPv4 unless the host is an IPv6 address): "localhost" -> 127.0.0.1 even where /etc/hosts
    # lists ::1 first, or no peer on IPv4 would find a pair. str(): a sockaddr starts with the address.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = str(socket.getaddrinfo(host, None, family=family, type=socket.SOCK_DGRAM)[0][4][0])
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [address]
