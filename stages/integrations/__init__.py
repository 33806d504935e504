"""talkstream inside voice-agent frameworks: a LiveKit Agents avatar (`livekit`) and a pipecat video service
(`pipecat`), each in its own extra and imported only by whoever uses it."""
