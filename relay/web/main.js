// The browser voice page: push-to-talk (or server VAD) voice sessions through the relay.
//
// Owns the page's flow and what it shows: a token from the demo backend
// (POST /demo/token, bound to this page's Origin), the session (realtime.js), the
// audio graph (audio.js), turns, barge-in, the transcript and the latency readout
// (speech end -- push-to-talk release or input_audio_buffer.speech_stopped -- to
// the first answer audio received, and to its first sample rendered).
//
// Query parameters: ?path=json  the plain JSON path (base64 audio in JSON events);
//                   ?vad=1      start hands-free (server VAD) instead of push-to-talk;
//                   ?processing=off  no echo cancellation, noise suppression or gain
//                               control on the microphone (a measured signal);
//                   ?rate=HZ    force the AudioContext's sample rate.
//
// Everything the page knows is in window.relayDemo (plain data, for tests and the
// curious), with relayDemo.when(predicate) resolving once predicate(relayDemo) holds.

import { AudioEngine } from './audio.js';
import { PCM16_RATE_HZ, pcm16Samples, sumOfSquares } from './pcm.js';
import { RealtimeSession } from './realtime.js';

const params = new URLSearchParams(location.search);
const options = {
  binary: params.get('path') !== 'json',
  vad: params.get('vad') === '1',
  processing: params.get('processing') !== 'off',
  sampleRateHz: Number(params.get('rate')) || undefined,
};

/** A turn shorter than this is not committed (the API refuses commits under 100 ms). */
const MIN_TURN_MS = 120;
/** The input transcription model the page asks for. */
const TRANSCRIPTION_MODEL = 'gpt-4o-mini-transcribe';
/** Server VAD: silence that ends a turn (milliseconds). */
const VAD_SILENCE_MS = 500;
/** relayDemo.when() gives up after this long unless told otherwise (milliseconds). */
const WHEN_TIMEOUT_MS = 30000;

const $ = (id) => document.getElementById(id);

const state = {
  status: 'idle',
  path: options.binary ? 'binary' : 'json',
  protocol: '',
  handsFree: options.vad,
  sessionId: '',
  model: '',
  turnsStarted: 0,
  turnsCompleted: 0,
  responsesCancelled: 0,
  bytesSent: 0,
  bytesReceived: 0,
  audioBytesReceived: 0,
  chunksSent: 0,
  chunksDropped: 0,
  sentSamples: 0,
  sentRms: 0,
  receivedSamples: 0,
  contextRateHz: 0,
  playedSamples: 0,
  playedMs: 0,
  playedRms: 0,
  underruns: 0,
  droppedSamples: 0,
  transcript: '',
  items: [], // {role: 'user'|'assistant', itemId, text, final}
  turnSentSamples: [], // samples sent per push-to-talk turn
  truncations: [], // {itemId, audioEndMs}: what the server confirmed of a barge-in
  latencyMs: [], // {turn, receivedMs, playedMs}
  errors: [],
  notes: [],
  eventCounts: {},
};
window.relayDemo = state;

/** The first this many bytes of sent audio are kept for relayDemo.sentAudioSha256() (60 s). */
const SENT_AUDIO_KEPT_BYTES = 60 * PCM16_RATE_HZ * 2;

let sentSumSquares = 0;
const sentAudio = new Uint8Array(SENT_AUDIO_KEPT_BYTES);
let sentAudioBytes = 0; // all of it, kept or not
let turnStartSamples = 0;
let engine = null;
let session = null;
let waiters = [];
let turn = null; // {number, speechEndedAt, responseId, receivedMs, playedMs}
const responses = new Map(); // response id -> {done, drained, hadAudio, status, turn}
const parts = new Map(); // part key -> {responseId, itemId, contentIndex}
const cancelled = new Set();
let activeResponseId = null;
let talking = false;

Object.defineProperty(state, 'when', {
  enumerable: false,
  value(predicate, timeoutMs = WHEN_TIMEOUT_MS) {
    return new Promise((resolve, reject) => {
      if (predicate(state)) return resolve(snapshot());
      const waiter = { predicate, resolve };
      waiters.push(waiter);
      setTimeout(() => {
        if (!waiters.includes(waiter)) return;
        waiters = waiters.filter((w) => w !== waiter);
        reject(new Error(`timed out after ${timeoutMs} ms: ${JSON.stringify(snapshot())}`));
      }, timeoutMs);
    });
  },
});
Object.defineProperty(state, 'snapshot', { enumerable: false, value: () => snapshot() });
// Hex SHA-256 of the audio sent so far (null past SENT_AUDIO_KEPT_BYTES): a test compares
// it with what the upstream received.
Object.defineProperty(state, 'sentAudioSha256', {
  enumerable: false,
  async value() {
    if (sentAudioBytes > SENT_AUDIO_KEPT_BYTES) return null;
    const digest = await crypto.subtle.digest('SHA-256', sentAudio.subarray(0, sentAudioBytes));
    return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
  },
});

function snapshot() {
  return JSON.parse(JSON.stringify(state));
}

/** Something changed: refresh the page and wake the waiters whose condition now holds. */
function changed() {
  render();
  const ready = waiters.filter((w) => w.predicate(state));
  if (ready.length === 0) return;
  waiters = waiters.filter((w) => !ready.includes(w));
  const copy = snapshot();
  for (const w of ready) w.resolve(copy);
}

function setStatus(status) {
  state.status = status;
  changed();
}

function fail(message) {
  state.errors.push(message);
  $('error').textContent = message;
  $('error').hidden = false;
  changed();
}

// ------------------------------------------------------------------ connecting

async function connect() {
  $('connect').disabled = true;
  setStatus('connecting');
  try {
    engine = await AudioEngine.open(options);
    state.contextRateHz = engine.sampleRateHz;
    engine.onChunk = sendChunk;
    engine.addEventListener('level', (event) => {
      $('mic-level').value = Math.min(1, event.detail * 4);
    });
    engine.addEventListener('status', (event) => playbackStatus(event.detail));
    engine.addEventListener('started', (event) => partStarted(event.detail));
    engine.addEventListener('drained', (event) => partDrained(event.detail));

    const answer = await fetch('/demo/token', { method: 'POST' });
    const body = await answer.json();
    if (!answer.ok) throw new Error(`token refused: ${body.error ? body.error.message : answer.status}`);
    state.model = body.session && body.session.model ? body.session.model : 'gpt-realtime';
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const url = `${scheme}://${location.host}/v1/realtime?model=${encodeURIComponent(state.model)}`;
    session = new RealtimeSession({ url, token: body.value, binary: options.binary });
    session.onEvent = onEvent;
    session.onAudioPart = onAudioPart;
    session.onAudio = onAudio;
    session.onClose = (event) => {
      talking = false;
      setStatus(event.code === 1000 ? 'closed' : `closed (${event.code}${event.reason ? ' ' + event.reason : ''})`);
      $('talk').disabled = true;
      $('connect').textContent = 'Connect';
      $('connect').disabled = false;
    };
    await session.open();
    state.protocol = session.protocol;
    state.path = session.binary ? 'binary' : 'json';
    if (options.binary && !session.binary) {
      state.notes.push(`the relay selected "${session.protocol}", not relay.audio.v1: using the JSON path`);
    }
    setStatus('opening session');
  } catch (error) {
    if (engine) await engine.close();
    engine = null;
    $('connect').disabled = false;
    setStatus('idle');
    fail(String(error.message || error));
  }
}

async function hangUp() {
  if (session) session.close();
  if (engine) await engine.close();
  engine = null;
  session = null;
}

function sessionUpdate() {
  const detection = state.handsFree
    ? { type: 'server_vad', silence_duration_ms: VAD_SILENCE_MS, create_response: true, interrupt_response: true }
    : null;
  session.send({
    type: 'session.update',
    session: {
      type: 'realtime',
      audio: { input: { turn_detection: detection, transcription: { model: TRANSCRIPTION_MODEL } } },
    },
  });
}

// ------------------------------------------------------------------ talking

function sendChunk(pcm) {
  if (!session) return;
  const samples = pcm16Samples(pcm);
  if (sentAudioBytes + pcm.byteLength <= SENT_AUDIO_KEPT_BYTES) {
    sentAudio.set(new Uint8Array(pcm), sentAudioBytes);
  }
  if (!session.sendAudio(pcm)) {
    state.chunksDropped = session.chunksDropped;
    return;
  }
  sentAudioBytes += pcm.byteLength;
  state.chunksSent++;
  state.sentSamples += samples.length;
  sentSumSquares += sumOfSquares(samples);
  state.sentRms = Math.sqrt(sentSumSquares / state.sentSamples);
  state.bytesSent = session.bytesSent;
  changed();
}

function pressTalk() {
  if (talking || state.handsFree || !session || !session.isOpen || state.status === 'opening session') return;
  talking = true;
  turnStartSamples = state.sentSamples;
  engine.startTalking();
  bargeIn(true);
  state.turnsStarted++;
  $('talk').classList.add('active');
  setStatus('listening');
}

async function releaseTalk() {
  if (!talking || state.handsFree) return;
  talking = false;
  $('talk').classList.remove('active');
  const speechEndedAt = performance.now();
  const samples = await engine.stopTalking();
  state.turnSentSamples.push(state.sentSamples - turnStartSamples);
  if ((samples * 1000) / PCM16_RATE_HZ < MIN_TURN_MS) {
    session.send({ type: 'input_audio_buffer.clear' });
    setStatus('ready (hold the button while you speak)');
    return;
  }
  turn = { number: state.turnsStarted, speechEndedAt, responseId: null, receivedMs: null, playedMs: null };
  session.send({ type: 'input_audio_buffer.commit' });
  session.send({ type: 'response.create' });
  setStatus('thinking');
}

/** The user speaks over the answer: stop it, tell the server what was heard of it. */
async function bargeIn(cancelResponse) {
  const active = activeResponseId;
  if (active && cancelResponse && !responses.get(active).done) {
    session.send({ type: 'response.cancel' });
  }
  if (active) cancelled.add(active);
  const cut = await engine.flush();
  const part = cut.id ? parts.get(cut.id) : null;
  if (part) {
    session.send({
      type: 'conversation.item.truncate',
      item_id: part.itemId,
      content_index: part.contentIndex,
      audio_end_ms: Math.floor(cut.playedMs),
    });
  }
  for (const [key, info] of parts) {
    const response = responses.get(info.responseId);
    if (response) response.drained = true;
    parts.delete(key);
  }
  changed();
}

async function setHandsFree(on) {
  state.handsFree = on;
  $('talk').disabled = on || !session;
  if (!session || !session.isOpen) return changed();
  if (on) {
    sessionUpdate();
    engine.startTalking();
    setStatus('listening (hands-free)');
  } else {
    await engine.stopTalking();
    sessionUpdate();
    session.send({ type: 'input_audio_buffer.clear' });
    setStatus('ready');
  }
}

// ------------------------------------------------------------------ server events

function onEvent(event) {
  state.eventCounts[event.type] = (state.eventCounts[event.type] || 0) + 1;
  state.bytesReceived = session.bytesReceived;
  switch (event.type) {
    case 'session.created':
      state.sessionId = event.session.id;
      sessionUpdate();
      break;
    case 'session.updated':
      if (state.status === 'opening session') {
        $('talk').disabled = state.handsFree;
        $('connect').textContent = 'Hang up';
        $('connect').disabled = false;
        if (state.handsFree) {
          engine.startTalking();
          setStatus('listening (hands-free)');
        } else {
          setStatus('ready');
        }
      }
      break;
    case 'input_audio_buffer.speech_started':
      if (state.handsFree) {
        state.turnsStarted++;
        bargeIn(false); // the server cancels the response itself (interrupt_response)
        setStatus('listening (hands-free)');
      }
      break;
    case 'input_audio_buffer.speech_stopped':
      if (state.handsFree) {
        turn = { number: state.turnsStarted, speechEndedAt: performance.now(), responseId: null, receivedMs: null, playedMs: null };
        setStatus('thinking');
      }
      break;
    case 'response.created': {
      const id = event.response.id;
      activeResponseId = id;
      responses.set(id, { done: false, drained: false, hadAudio: false, status: '', turn });
      if (turn && turn.responseId === null) turn.responseId = id;
      break;
    }
    case 'response.output_audio.done': {
      const key = `${event.response_id}/${event.item_id}/${event.output_index}/${event.content_index}`;
      if (parts.has(key)) engine.endPart(key);
      break;
    }
    case 'response.output_audio_transcript.delta':
      itemText('assistant', event.item_id, event.delta, false);
      break;
    case 'response.output_audio_transcript.done':
      itemText('assistant', event.item_id, event.transcript, true);
      break;
    case 'conversation.item.input_audio_transcription.delta':
      itemText('user', event.item_id, event.delta, false);
      break;
    case 'conversation.item.input_audio_transcription.completed':
      itemText('user', event.item_id, event.transcript, true);
      break;
    case 'response.done': {
      const id = event.response.id;
      const response = responses.get(id) || { drained: true, hadAudio: false, turn: null };
      response.done = true;
      response.status = event.response.status;
      if (!response.hadAudio) response.drained = true;
      responses.set(id, response);
      if (activeResponseId === id) activeResponseId = null;
      if (response.status === 'cancelled') state.responsesCancelled++;
      finishIfPlayed(id);
      break;
    }
    case 'conversation.item.truncated':
      state.truncations.push({ itemId: event.item_id, audioEndMs: event.audio_end_ms });
      break;
    case 'error':
      fail(`${event.error.code || event.error.type}: ${event.error.message}`);
      break;
  }
  changed();
}

function onAudioPart(part) {
  const responseId = part.ids.response_id;
  if (cancelled.has(responseId)) {
    part.discard = true; // in flight when the user barged in
    return;
  }
  parts.set(part.key, { responseId, itemId: part.ids.item_id, contentIndex: part.ids.content_index });
  const response = responses.get(responseId);
  if (response) response.hadAudio = true;
  engine.startPart(part.key);
  setStatus('speaking');
}

function onAudio(pcm, part) {
  if (part.discard || cancelled.has(part.ids.response_id)) return; // barged in on it
  state.receivedSamples += pcm.byteLength >> 1;
  state.audioBytesReceived = session.audioBytesReceived;
  state.bytesReceived = session.bytesReceived;
  const info = parts.get(part.key);
  const response = info ? responses.get(info.responseId) : null;
  const owner = response ? response.turn : null;
  if (owner && owner.receivedMs === null) owner.receivedMs = performance.now() - owner.speechEndedAt;
  engine.play(pcm);
  changed();
}

function partStarted(key) {
  const info = parts.get(key);
  const response = info ? responses.get(info.responseId) : null;
  const owner = response ? response.turn : null;
  if (owner && owner.playedMs === null) owner.playedMs = performance.now() - owner.speechEndedAt;
  changed();
}

function partDrained(key) {
  const info = parts.get(key);
  if (!info) return;
  // Everything queued before this point has played: every part so far is done.
  for (const [other, detail] of parts) {
    const response = responses.get(detail.responseId);
    if (response) response.drained = true;
    parts.delete(other);
  }
  finishIfPlayed(info.responseId);
  changed();
}

/** A turn is complete once its response is done and its audio has been heard. */
function finishIfPlayed(responseId) {
  const response = responses.get(responseId);
  if (!response || !response.done || !response.drained || response.finished) return;
  response.finished = true;
  if (response.status === 'completed') {
    state.turnsCompleted++;
    const owner = response.turn;
    if (owner) {
      state.latencyMs.push({
        turn: owner.number,
        receivedMs: owner.receivedMs === null ? null : Math.round(owner.receivedMs),
        playedMs: owner.playedMs === null ? null : Math.round(owner.playedMs),
      });
    }
  }
  if (!talking && state.status === 'speaking') setStatus(state.handsFree ? 'listening (hands-free)' : 'ready');
}

function playbackStatus(status) {
  state.playedSamples = status.playedSamples;
  state.playedMs = Math.round((status.playedSamples * 1000) / (state.contextRateHz || 1));
  state.playedRms = status.playedSamples ? Math.sqrt(status.playedSumSquares / status.playedSamples) : 0;
  state.underruns = status.underruns;
  state.droppedSamples = status.droppedSamples;
  changed();
}

function itemText(role, itemId, text, final) {
  let item = state.items.find((i) => i.itemId === itemId && i.role === role);
  if (!item) {
    item = { role, itemId, text: '', final: false };
    state.items.push(item);
  }
  item.text = final ? text : item.text + text;
  item.final = final;
  state.transcript = state.items.map((i) => `${i.role === 'user' ? 'You' : 'Assistant'}: ${i.text}`).join('\n');
}

// ------------------------------------------------------------------ the page

let renderQueued = false;
function render() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    $('status').textContent = state.status;
    $('protocol').textContent = state.protocol
      ? `${state.path === 'binary' ? 'binary audio (relay.audio.v1)' : 'JSON (base64 audio)'}, subprotocol "${state.protocol}"`
      : options.binary ? 'binary audio requested' : 'JSON requested';
    const last = state.latencyMs[state.latencyMs.length - 1];
    $('latency').textContent = last
      ? `turn ${last.turn}: first audio received ${last.receivedMs ?? '–'} ms, played ${last.playedMs ?? '–'} ms`
      : '–';
    $('latency-rows').replaceChildren(
      ...state.latencyMs.map((l) => {
        const row = document.createElement('tr');
        for (const value of [l.turn, l.receivedMs ?? '–', l.playedMs ?? '–']) {
          const cell = document.createElement('td');
          cell.textContent = String(value);
          row.append(cell);
        }
        return row;
      }),
    );
    const transcript = $('transcript');
    transcript.replaceChildren(
      ...state.items.map((item) => {
        const line = document.createElement('p');
        line.className = item.role;
        const who = document.createElement('b');
        who.textContent = item.role === 'user' ? 'You' : 'Assistant';
        line.append(who, ' ', item.text);
        return line;
      }),
    );
    $('stat-sent').textContent = `${state.bytesSent.toLocaleString()} B (${state.chunksSent} chunks, ${(state.sentSamples / PCM16_RATE_HZ).toFixed(1)} s)`;
    $('stat-received').textContent = `${state.bytesReceived.toLocaleString()} B (${(state.receivedSamples / PCM16_RATE_HZ).toFixed(1)} s of audio)`;
    $('stat-played').textContent = `${(state.playedMs / 1000).toFixed(1)} s at ${state.contextRateHz || '–'} Hz, ${state.underruns} underruns`;
    $('stat-turns').textContent = `${state.turnsCompleted} completed`;
  });
}

function wire() {
  $('vad').checked = options.vad;
  $('connect').addEventListener('click', () => (session ? hangUp() : connect()));
  const talk = $('talk');
  talk.addEventListener('pointerdown', (event) => {
    talk.setPointerCapture(event.pointerId);
    pressTalk();
  });
  talk.addEventListener('pointerup', () => releaseTalk());
  talk.addEventListener('pointercancel', () => releaseTalk());
  talk.addEventListener('contextmenu', (event) => event.preventDefault());
  document.addEventListener('keydown', (event) => {
    if (event.code === 'Space' && !event.repeat && event.target === document.body) {
      event.preventDefault();
      pressTalk();
    }
  });
  document.addEventListener('keyup', (event) => {
    if (event.code === 'Space' && event.target === document.body) releaseTalk();
  });
  $('vad').addEventListener('change', (event) => setHandsFree(event.target.checked));
  render();
}

wire();
