const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.hash.slice(1)).get("token");
// the avatar's voice comes out of the speakers: without echo cancellation the microphone would feed it back
const VOICE = {echoCancellation: true, noiseSuppression: true, autoGainControl: true};
// browsers only open a microphone for HTTPS pages and localhost
const MICROPHONE_ALLOWED = window.isSecureContext && Boolean(navigator.mediaDevices?.getUserMedia);
let session = null, pc = null, microphone = null, timer = null;

const setStatus = (text) => { $("status").textContent = text; };
const showError = (text) => { $("error").textContent = text; };
const TOKEN_HINT = `open this page as ${location.origin}${location.pathname}#token=TOKEN (URL-encoded)`;

async function api(path, options = {}) {
  if (token) options.headers = {...options.headers, Authorization: `Bearer ${token}`};
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error(`cannot reach the server (${error.message})`);
  }
  let body = null;
  try {
    body = JSON.parse(await response.text());
  } catch {
    // not JSON (a proxy's error page, say): the status line below says what happened
  }
  if (!response.ok) {
    const message = body?.error || `HTTP ${response.status} ${response.statusText}`.trim();
    throw new Error(response.status === 401 ? `${message}; ${TOKEN_HINT}` : message);
  }
  if (body === null) throw new Error(`the server answered HTTP ${response.status} without JSON`);
  return body;
}

function fill(select, values, chosen) {
  select.replaceChildren(...values.map((value) => new Option(value, value, false, value === chosen)));
}

async function loadConfig() {
  try {
    const config = await api("/api/config");
    fill($("preset"), config.presets, config.preset);
    fill($("example"), config.examples, config.examples[0]);
    if (config.token_required && !token) showError(`this server needs a token: ${TOKEN_HINT}`);
  } catch (error) {
    showError(`cannot load the server's settings: ${error.message}`);
  }
  setStatus("not connected");
  $("connect").disabled = false;
}

function gathered(peer) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => peer.addEventListener("icegatheringstatechange", () => {
    if (peer.iceGatheringState === "complete") resolve();
  }));
}

async function openMicrophone() {
  try {
    return await navigator.mediaDevices.getUserMedia({audio: VOICE});
  } catch (error) {
    throw new Error(`cannot open the microphone (${error.message}); untick "microphone" to connect without it`);
  }
}

function followConnection(peer) {
  if (peer !== pc) return;  // a closed connection's last events
  if (peer.connectionState === "connected") setStatus("connected");
  else if (peer.connectionState === "disconnected") setStatus("connection interrupted, waiting…");
  else if (peer.connectionState === "failed") {
    hangUp();
    showError("the connection failed: no network path between this browser and the server");
  }
}

async function connect() {
  $("connect").disabled = true;
  try {
    // asked before the session exists: a refused microphone leaves nothing behind on the server
    if ($("mic").checked) {
      setStatus("opening the microphone…");
      microphone = await openMicrophone();
    }
    setStatus("preparing the avatar…");
    const form = new FormData();
    if ($("portrait").files.length) form.append("portrait", $("portrait").files[0]);
    else form.append("example", $("example").value);
    form.append("preset", $("preset").value);
    session = (await api("/api/sessions", {method: "POST", body: form})).id;
    setStatus("connecting…");
    const peer = pc = new RTCPeerConnection({iceServers: []});
    peer.onconnectionstatechange = () => followConnection(peer);
    peer.addTransceiver("video", {direction: "recvonly"});
    if (microphone) microphone.getTracks().forEach((track) => peer.addTrack(track, microphone));
    else peer.addTransceiver("audio", {direction: "recvonly"});
    const stream = new MediaStream();
    peer.ontrack = (event) => { stream.addTrack(event.track); $("video").srcObject = stream; };
    await peer.setLocalDescription(await peer.createOffer());
    await gathered(peer);
    const answer = await api(`/api/sessions/${session}/offer`, {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({sdp: peer.localDescription.sdp, type: peer.localDescription.type}),
    });
    await peer.setRemoteDescription(answer);
    $("interrupt").disabled = $("hangup").disabled = false;
    timer = setInterval(showStats, 500);
  } catch (error) {
    await hangUp();  // no half-made session left on the server, no microphone left open
    throw error;
  }
}

async function showStats() {
  if (!pc) return;
  const quality = $("video").getVideoPlaybackQuality();
  let fps = 0, delay = 0;
  (await pc.getStats()).forEach((report) => {
    if (report.type === "inbound-rtp" && report.kind === "video") {
      fps = report.framesPerSecond || 0;
      delay = report.jitterBufferEmittedCount ? 1000 * report.jitterBufferDelay / report.jitterBufferEmittedCount : 0;
    }
  });
  $("stats").textContent = `${fps.toFixed(0)} fps · ${quality.totalVideoFrames} frames · ` +
    `${quality.droppedVideoFrames} dropped · jitter buffer ${delay.toFixed(0)} ms`;
}

async function sayFile() {
  const file = $("speech").files[0];
  $("speech").value = "";  // so that choosing the same file again is a change again
  if (!file) return;
  if (!session) throw new Error("connect first, then say a file");
  const form = new FormData();
  form.append("audio", file);
  await api(`/api/sessions/${session}/speak`, {method: "POST", body: form});
}

async function hangUp() {
  const closing = session;
  clearInterval(timer);
  pc?.close();
  microphone?.getTracks().forEach((track) => track.stop());
  session = pc = microphone = timer = null;
  $("video").srcObject = null;
  $("stats").textContent = "";
  $("interrupt").disabled = $("hangup").disabled = true;
  $("connect").disabled = false;
  setStatus("not connected");
  // a session the server closed already needs no goodbye
  if (closing) await api(`/api/sessions/${closing}`, {method: "DELETE"}).catch(() => {});
}

// every action clears the last one's error and shows its own
const act = (action) => () => {
  showError("");
  action().catch((error) => showError(error.message));
};
$("connect").onclick = act(connect);
$("hangup").onclick = act(hangUp);
$("interrupt").onclick = act(() => api(`/api/sessions/${session}/interrupt`, {method: "POST"}));
$("speech").onchange = act(sayFile);
$("mute").onchange = () => { $("video").muted = $("mute").checked; };
// Leaving or reloading the page hangs up: the server's slot is freed now, not when its idle timeout ends.
window.addEventListener("pagehide", () => {
  if (!session) return;
  const headers = token ? {Authorization: `Bearer ${token}`} : {};
  fetch(`/api/sessions/${session}`, {method: "DELETE", headers, keepalive: true});
});
if (!MICROPHONE_ALLOWED) {
  $("mic").checked = false;
  $("mic").disabled = true;
  $("mic-note").textContent = "the microphone needs HTTPS or localhost; connecting without it";
  $("mic-note").hidden = false;
}
loadConfig();
