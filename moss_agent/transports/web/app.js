// moss-agent voice page: microphone -> WebRTC -> agent, agent audio back, events over a data channel.
// Query parameters: token (signaling bearer token), client (a client id), autostart=1,
// processing=0 (no echo cancellation / noise suppression / AGC, for measurements), relay=1 (TURN
// relay only: hides this machine's addresses; needs a TURN server), connect_timeout (seconds, 20).
"use strict";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const CONNECT_TIMEOUT_MS = 1000 * (Number(params.get("connect_timeout")) || 20);
const NETWORK_ADVICE = "If the server runs on a machine without a network, start it with --loopback-only; "
  + "across NAT it needs --ice-server.";
const TURNS_REPORTED = 20;
// One call's objects; hangUp() releases them all, so Start can call again.
const call = { id: 0, pc: null, channel: null, mic: null, audio: null, timers: [], connectTimer: null, connected: false };
const state = { pendingTurn: null, rows: new Map(), lines: new Map(), turns: new Map(), currentTurn: null, stats: {} };
window.results = state.stats;

function setStatus(text) { $("status").textContent = text; }

function setButtons(phase) {
  // idle: only Start; calling: Hang up (and Interrupt once the channel is open).
  $("start").disabled = phase !== "idle";
  $("hangup").disabled = phase === "idle";
  if (phase !== "open") $("interrupt").disabled = true;
  if (phase === "open") $("interrupt").disabled = false;
}

// Text deltas append to the open line of their (role, turn); a final delta closes that line. The
// last line of each (role, turn) is remembered, so a late note (an interruption) joins it.
function say(role, text, { turnId = "", final = true } = {}) {
  const box = $("transcript");
  const key = `${role}:${turnId}`;
  let line = [...box.querySelectorAll("p[data-open]")].find((p) => p.dataset.open === key);
  if (!line) {
    if (!text) return;
    line = document.createElement("p");
    line.className = role;
    line.dataset.open = key;
    if (turnId !== "") line.dataset.turn = turnId;
    box.appendChild(line);
    state.lines.set(key, line);
  }
  line.textContent += text;
  if (final) line.removeAttribute("data-open");
  box.scrollTop = box.scrollHeight;
}

function note(role, text, turnId) {
  const line = state.lines.get(`${role}:${turnId}`);
  if (line) line.textContent += text;
  else say(role, text, { turnId });
}

function turnRow(turnId) {
  if (!state.rows.has(turnId)) {
    const row = document.createElement("tr");
    row.innerHTML = "<td></td><td></td><td></td><td></td>";
    row.cells[0].textContent = turnId;
    $("turns").appendChild(row);
    state.rows.set(turnId, row);
  }
  return state.rows.get(turnId);
}

// Server figures: seconds as ms, the real-time factor as a ratio, counts as they are.
function formatFigure(key, value) {
  const name = key.replace(/_s$/, "");
  if (key === "rtf") return `rtf ${value.toFixed(2)}`;
  if (key.endsWith("_s")) return `${name} ${(value * 1000).toFixed(0)} ms`;
  return `${name} ${value}`;
}

// Concealed samples per turn: what the browser's jitter buffer had to invent because a packet was
// missing, counted from the turn's start until the next turn starts (or the call ends).
async function inboundAudio() {
  if (!call.pc) return null;
  let found = null;
  (await call.pc.getStats()).forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "audio") found = s; });
  return found;
}

function countTurn(turnId, inbound) {
  const turn = state.turns.get(turnId);
  if (!turn || !inbound) return;
  turn.concealedSamples = (inbound.concealedSamples || 0) - turn.base.concealed;
  turn.silentConcealedSamples = (inbound.silentConcealedSamples || 0) - turn.base.silent;
  turn.concealmentEvents = (inbound.concealmentEvents || 0) - turn.base.events;
  turnRow(turnId).cells[2].textContent = (turn.concealedSamples / 48).toFixed(0); // Opus: 48 kHz
}

async function openTurn(turnId) {
  const inbound = await inboundAudio();
  if (state.currentTurn !== null) countTurn(state.currentTurn, inbound);
  state.currentTurn = turnId;
  state.turns.set(turnId, {
    base: { concealed: inbound?.concealedSamples || 0, silent: inbound?.silentConcealedSamples || 0,
            events: inbound?.concealmentEvents || 0 },
    concealedSamples: 0, silentConcealedSamples: 0, concealmentEvents: 0, heardMs: null,
  });
  while (state.turns.size > TURNS_REPORTED) state.turns.delete(state.turns.keys().next().value);
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
      openTurn(event.turn_id).catch((err) => console.warn("stats", err));
      break;
    case "metrics": {
      const figures = Object.entries(event.values || {})
        .filter(([, v]) => v !== null && typeof v === "number")
        .map(([k, v]) => formatFigure(k, v));
      turnRow(event.turn_id).cells[3].textContent = figures.join(", ");
      break;
    }
    case "interrupted":
      note("assistant", ` [interrupted after ${Number(event.heard_s || 0).toFixed(1)} s]`, event.turn_id);
      break;
    case "error":
    case "error_event":
      say("error", event.message || "the server reported a problem");
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
  call.audio = ctx;
  const meter = (stream) => {
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 4096;
    ctx.createMediaStreamSource(stream).connect(analyser);
    return analyser;
  };
  const micAnalyser = meter(micStream);
  const agentAnalyser = meter(agentStream);
  const buffer = new Float32Array(4096);
  call.timers.push(setInterval(() => {
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
      const heard = performance.now() - pending.since;
      turnRow(pending.turnId).cells[1].textContent = heard.toFixed(0);
      const turn = state.turns.get(pending.turnId);
      if (turn) turn.heardMs = heard;
      state.pendingTurn = null;
    }
  }, 20));
}

async function reportStats() {
  const s = await inboundAudio();
  if (s) {
    Object.assign(state.stats, {
      packetsReceived: s.packetsReceived,
      totalAudioEnergy: s.totalAudioEnergy,
      totalSamplesDuration: s.totalSamplesDuration,
      audioLevel: s.audioLevel,
      jitter: s.jitter,
      concealedSamples: s.concealedSamples,
      silentConcealedSamples: s.silentConcealedSamples,
    });
    if (state.currentTurn !== null) countTurn(state.currentTurn, s);
  }
  state.stats.turns = Object.fromEntries([...state.turns].map(([id, t]) => [id, {
    concealedSamples: t.concealedSamples, silentConcealedSamples: t.silentConcealedSamples,
    concealmentEvents: t.concealmentEvents, heardMs: t.heardMs,
  }]));
  state.stats.transcriptTail = $("transcript").textContent.slice(-200);
  $("stats").textContent = JSON.stringify(state.stats, null, 1);
  if (call.channel?.readyState === "open") {
    call.channel.send(JSON.stringify({ type: "stats", ...state.stats }));
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

const hasCandidates = (sdp) => /^a=candidate:/m.test(sdp || "");

function connectionFailed(why) {
  if (call.connected) {
    say("error", `the call's audio connection was lost (${why})`);
    hangUp("connection lost");
    return;
  }
  say("error", `the audio connection could not be set up (${why}). ${NETWORK_ADVICE}`);
  hangUp(`not connected: ${why}`);
}

async function start() {
  const id = ++call.id; // every await below re-checks it: Hang up may have ended this call meanwhile
  setButtons("calling");
  setStatus("asking for the microphone…");
  const processing = params.get("processing") !== "0";
  const mic = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: processing, noiseSuppression: processing, autoGainControl: processing },
  });
  if (call.id !== id) { mic.getTracks().forEach((t) => t.stop()); return; }
  call.mic = mic;
  const headers = { "Content-Type": "application/json" };
  const token = params.get("token");
  if (token) headers.Authorization = `Bearer ${token}`;
  const config = { iceServers: await iceServers(headers) };
  if (params.get("relay") === "1") config.iceTransportPolicy = "relay";
  if (call.id !== id) return;
  const pc = new RTCPeerConnection(config);
  call.pc = pc;
  mic.getTracks().forEach((track) => pc.addTrack(track, mic));
  const channel = pc.createDataChannel("events");
  call.channel = channel;
  channel.onmessage = (msg) => { try { onEvent(JSON.parse(msg.data)); } catch (err) { console.warn(err); } };
  channel.onopen = () => { if (call.channel === channel) setButtons("open"); };
  channel.onclose = () => { if (call.channel === channel) hangUp("the agent ended the call"); };
  pc.ontrack = (ev) => {
    const el = $("agent-audio");
    el.srcObject = ev.streams[0] || new MediaStream([ev.track]);
    el.play().catch((err) => console.warn("autoplay", err));
    watchLevels(mic, el.srcObject);
  };
  pc.onconnectionstatechange = () => {
    if (call.pc !== pc) return;
    setStatus(pc.connectionState);
    state.stats.connectionState = pc.connectionState;
    if (pc.connectionState === "connected") {
      call.connected = true;
      clearTimeout(call.connectTimer);
    }
    if (pc.connectionState === "failed") connectionFailed("ICE found no working network path");
  };
  await pc.setLocalDescription(await pc.createOffer());
  setStatus("gathering network candidates…");
  await waitForIce(pc, 5000);
  if (call.id !== id) return;
  if (!hasCandidates(pc.localDescription.sdp)) {
    say("error", "this browser found no network address for the call (no ICE candidate); trying anyway");
  }
  const client = params.get("client") ? `?client=${encodeURIComponent(params.get("client"))}` : "";
  const response = await fetch(`offer${client}`, {
    method: "POST", headers, body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
  });
  const answer = await response.json();
  if (call.id !== id) return;
  if (!response.ok) {
    say("error", `the server refused the call (${response.status}): ${answer.message || ""}`);
    hangUp(`refused: ${answer.message || response.status}`);
    return;
  }
  if (answer.warning) say("error", answer.warning);
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  setStatus("connecting…");
  call.connectTimer = setTimeout(() => {
    if (call.id === id && !call.connected) {
      connectionFailed(`no connection within ${CONNECT_TIMEOUT_MS / 1000} s`);
    }
  }, CONNECT_TIMEOUT_MS);
  call.timers.push(setInterval(() => reportStats().catch((err) => console.warn("stats", err)), 500));
}

function interrupt() {
  if (call.channel?.readyState === "open") call.channel.send(JSON.stringify({ type: "interrupt" }));
}

function hangUp(status = "hung up") {
  call.id += 1;
  if (call.channel?.readyState === "open") call.channel.send(JSON.stringify({ type: "close" }));
  clearTimeout(call.connectTimer);
  call.timers.forEach((timer) => clearInterval(timer));
  call.pc?.close();
  call.mic?.getTracks().forEach((t) => t.stop());
  call.audio?.close().catch(() => {});
  Object.assign(call, { pc: null, channel: null, mic: null, audio: null, timers: [], connectTimer: null, connected: false });
  state.currentTurn = null;
  state.pendingTurn = null;
  setStatus(status);
  setButtons("idle");
}

$("start").onclick = () => {
  const id = call.id + 1;
  start().catch((err) => {
    if (call.id !== id) return; // an old call's failure after Hang up
    say("error", `the call failed: ${err}`);
    hangUp(`failed: ${err}`);
  });
};
$("interrupt").onclick = interrupt;
$("hangup").onclick = () => hangUp();
if (params.get("autostart") === "1") $("start").click();
