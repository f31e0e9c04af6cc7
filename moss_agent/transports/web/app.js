// moss-agent voice page: microphone -> WebRTC -> agent, agent audio back, events over a data channel.
// Query parameters: token (signaling bearer token), client (a client id), autostart=1,
// processing=0 (no echo cancellation / noise suppression / AGC, for measurements).
"use strict";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const state = { pc: null, channel: null, mic: null, pendingTurn: null, turns: new Map(), stats: {} };
window.results = state.stats;

function setStatus(text) { $("status").textContent = text; }

// Text deltas append to the open line of their (role, turn); a final delta closes that line.
function say(role, text, { turnId = "", final = true } = {}) {
  const box = $("transcript");
  const key = `${role}:${turnId}`;
  let line = [...box.querySelectorAll("p[data-open]")].find((p) => p.dataset.open === key);
  if (!line) {
    if (!text) return;
    line = document.createElement("p");
    line.className = role;
    line.dataset.open = key;
    box.appendChild(line);
  }
  line.textContent += text;
  if (final) line.removeAttribute("data-open");
  box.scrollTop = box.scrollHeight;
}

function turnRow(turnId) {
  if (!state.turns.has(turnId)) {
    const row = document.createElement("tr");
    row.innerHTML = "<td></td><td></td><td></td>";
    row.cells[0].textContent = turnId;
    $("turns").appendChild(row);
    state.turns.set(turnId, row);
  }
  return state.turns.get(turnId);
}

function onEvent(event) {
  switch (event.type) {
    case "text_delta":
    case "transcript":
      say(event.role === "user" ? "user" : "assistant", event.text || "", { turnId: event.turn_id, final: !!event.final });
      break;
    case "user_stopped_speaking":
      state.pendingTurn = { turnId: null, since: performance.now() };
      break;
    case "turn_started":
      state.pendingTurn = { turnId: event.turn_id, since: state.pendingTurn?.since ?? performance.now() };
      turnRow(event.turn_id);
      break;
    case "metrics": {
      const figures = Object.entries(event.values || {})
        .filter(([, v]) => v !== null)
        .map(([k, v]) => `${k} ${typeof v === "number" && !Number.isInteger(v) ? (v * 1000).toFixed(0) + " ms" : v}`);
      turnRow(event.turn_id).cells[2].textContent = figures.join(", ");
      break;
    }
    case "interrupted":
      say("assistant", ` [interrupted after ${Number(event.heard_s || 0).toFixed(1)} s]`, { turnId: event.turn_id });
      break;
    case "error":
    case "error_event":
      say("error", `error: ${event.message}`);
      break;
    default:
      break;
  }
}

function rmsOf(analyser, buffer) {
  analyser.getFloatTimeDomainData(buffer);
  let sum = 0;
  for (const x of buffer) sum += x * x;
  return Math.sqrt(sum / buffer.length);
}

function watchLevels(micStream, agentStream) {
  const ctx = new AudioContext({ sampleRate: 48000 });
  const meter = (stream) => {
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 4096;
    ctx.createMediaStreamSource(stream).connect(analyser);
    return analyser;
  };
  const micAnalyser = meter(micStream);
  const agentAnalyser = meter(agentStream);
  const buffer = new Float32Array(4096);
  setInterval(() => {
    const mic = rmsOf(micAnalyser, buffer);
    const agent = rmsOf(agentAnalyser, buffer);
    $("mic-level").value = mic;
    $("agent-level").value = agent;
    state.stats.micRms = mic;
    state.stats.agentRms = agent;
    state.stats.agentRmsPeak = Math.max(agent, state.stats.agentRmsPeak || 0);
    const pending = state.pendingTurn;
    if (pending && pending.turnId !== null && agent > 0.01) {
      // Heard latency: user stopped speaking (or the turn started) -> agent audio audible here.
      turnRow(pending.turnId).cells[1].textContent = (performance.now() - pending.since).toFixed(0);
      state.pendingTurn = null;
    }
  }, 20);
}

async function reportStats() {
  if (!state.pc) return;
  const report = await state.pc.getStats();
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      Object.assign(state.stats, {
        packetsReceived: s.packetsReceived,
        totalAudioEnergy: s.totalAudioEnergy,
        totalSamplesDuration: s.totalSamplesDuration,
        audioLevel: s.audioLevel,
        jitter: s.jitter,
        concealedSamples: s.concealedSamples,
      });
    } else if (s.type === "outbound-rtp" && s.kind === "audio") {
      state.stats.packetsSent = s.packetsSent;
    }
  });
  state.stats.transcriptTail = $("transcript").textContent.slice(-200);
  $("stats").textContent = JSON.stringify(state.stats, null, 1);
  if (state.channel?.readyState === "open") {
    state.channel.send(JSON.stringify({ type: "stats", ...state.stats }));
  }
}

async function waitForIce(pc, capMs) {
  if (pc.iceGatheringState === "complete") return;
  await new Promise((resolve) => {
    const timer = setTimeout(resolve, capMs);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

// STUN/TURN servers the server was started with (none on a LAN or on this machine).
async function iceServers(headers) {
  try {
    const response = await fetch("ice", { headers });
    if (response.ok) return (await response.json()).iceServers || [];
    say("error", `could not read the ICE servers (${response.status}); trying without`);
  } catch (err) {
    console.warn("ice", err);
  }
  return [];
}

async function start() {
  $("start").disabled = true;
  setStatus("asking for the microphone…");
  const processing = params.get("processing") !== "0";
  const mic = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: processing, noiseSuppression: processing, autoGainControl: processing },
  });
  state.mic = mic;
  const headers = { "Content-Type": "application/json" };
  const token = params.get("token");
  if (token) headers.Authorization = `Bearer ${token}`;
  const pc = new RTCPeerConnection({ iceServers: await iceServers(headers) });
  state.pc = pc;
  mic.getTracks().forEach((track) => pc.addTrack(track, mic));
  const channel = pc.createDataChannel("events");
  state.channel = channel;
  channel.onmessage = (msg) => { try { onEvent(JSON.parse(msg.data)); } catch (err) { console.warn(err); } };
  channel.onopen = () => { $("interrupt").disabled = false; };
  pc.ontrack = (ev) => {
    const el = $("agent-audio");
    el.srcObject = ev.streams[0] || new MediaStream([ev.track]);
    el.play().catch((err) => console.warn("autoplay", err));
    watchLevels(mic, el.srcObject);
  };
  pc.onconnectionstatechange = () => {
    setStatus(pc.connectionState);
    state.stats.connectionState = pc.connectionState;
    if (pc.connectionState === "connected") $("hangup").disabled = false;
  };
  await pc.setLocalDescription(await pc.createOffer());
  setStatus("gathering network candidates…");
  await waitForIce(pc, 5000);
  const client = params.get("client") ? `?client=${encodeURIComponent(params.get("client"))}` : "";
  const response = await fetch(`offer${client}`, {
    method: "POST", headers, body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
  });
  const answer = await response.json();
  if (!response.ok) {
    setStatus(`refused: ${answer.message || response.status}`);
    say("error", `signaling refused (${response.status}): ${answer.message || ""}`);
    $("start").disabled = false;
    return;
  }
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  setStatus("connecting…");
  setInterval(reportStats, 500);
}

function interrupt() {
  if (state.channel?.readyState === "open") state.channel.send(JSON.stringify({ type: "interrupt" }));
}

function hangUp() {
  if (state.channel?.readyState === "open") state.channel.send(JSON.stringify({ type: "close" }));
  state.pc?.close();
  state.mic?.getTracks().forEach((t) => t.stop());
  setStatus("hung up");
  $("hangup").disabled = true;
  $("interrupt").disabled = true;
}

$("start").onclick = () => start().catch((err) => { setStatus(`failed: ${err}`); $("start").disabled = false; });
$("interrupt").onclick = interrupt;
$("hangup").onclick = hangUp;
if (params.get("autostart") === "1") $("start").click();
