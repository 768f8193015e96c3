// The speaker side of the page, on the audio rendering thread.
//
// Owns playing the answer: 24 kHz PCM16 from the relay, queued in a bounded ring
// (PLAYBACK_RING_SECONDS; what does not fit is dropped and counted, never grown),
// upsampled to the AudioContext's rate by a streaming resampler pulled one render
// quantum at a time, so the output runs on the audio clock whatever the network
// does. Playback of a stream starts once PLAYBACK_PREBUFFER_MS is queued, or at
// once when the part has ended (a short answer); an underrun before the end
// re-buffers and raises the target by PLAYBACK_PREBUFFER_STEP_MS (an adaptive
// jitter buffer, up to PLAYBACK_PREBUFFER_MAX_MS).
//
// Audio arrives in parts (one per response content part: a relay.output_audio.start
// marker on the binary path, a change of ids on the JSON path); parts queue back
// to back, and for each the processor knows how much has been heard, which is what
// conversation.item.truncate needs after a barge-in. The resampler holds back its
// last RESAMPLER_HALF_TAPS input samples (1 ms) until more audio comes: the last
// millisecond of an answer is not rendered, so that an answer that follows plays
// on without a seam.
//
// Messages from the page:  {type: 'part', id}            the audio that follows is part `id`;
//                          {type: 'audio', pcm}          PCM16 little-endian (ArrayBuffer);
//                          {type: 'end', id}             part `id` has all its audio;
//                          {type: 'flush'}               stop now, drop everything queued.
// Messages to the page:    {type: 'started', id}         the part's first sample was rendered;
//                          {type: 'drained', id}         everything up to the end of part `id` played;
//                          {type: 'flushed', id, playedMs}  what had been heard of the part cut;
//                          {type: 'status', ...}         counters, every STATUS_INTERVAL_QUANTA.

import { Resampler } from './resampler.js';

const SOURCE_RATE_HZ = 24000;
/** Capacity of the queue of answer audio not yet played (seconds of 24 kHz audio). */
const PLAYBACK_RING_SECONDS = 60;
/** Audio queued before a stream starts playing, first (milliseconds). */
const PLAYBACK_PREBUFFER_MS = 120;
/** Added to that target after each underrun, up to the maximum (milliseconds). */
const PLAYBACK_PREBUFFER_STEP_MS = 60;
const PLAYBACK_PREBUFFER_MAX_MS = 480;
/** Source samples pulled from the ring per resampler call. */
const PULL_SOURCE_SAMPLES = 64;
/** Counters go to the page every this many render quanta (about 21 ms at 48 kHz). */
const STATUS_INTERVAL_QUANTA = 8;

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ring = new Float32Array(SOURCE_RATE_HZ * PLAYBACK_RING_SECONDS);
    this.readIndex = 0;
    this.buffered = 0;
    /** Source samples ever queued, and ever pulled into the resampler. */
    this.written = 0;
    this.consumed = 0;
    this.parts = []; // {id, start, end|null, started}
    this.current = -1; // index in parts of the part being heard
    this.resampler = new Resampler(SOURCE_RATE_HZ, sampleRate);
    this.pull = new Float32Array(PULL_SOURCE_SAMPLES);
    this.pending = new Float32Array(this.resampler.maxOutput(PULL_SOURCE_SAMPLES + this.resampler.halfTaps * 2));
    this.pendingStart = 0;
    this.pendingLength = 0;
    this.playing = false;
    this.prebufferMs = PLAYBACK_PREBUFFER_MS;
    this.resetClock();
    // Counters the page reads.
    this.playedSamples = 0;
    this.playedSumSquares = 0;
    this.underruns = 0;
    this.droppedSamples = 0;
    this.quanta = 0;
    this.port.onmessage = (event) => this.command(event.data);
  }

  /** The resampler starts afresh; output sample j then is source time clockBase + j * step. */
  resetClock() {
    this.resampler.reset();
    this.clockBase = this.consumed;
    this.outputs = 0;
    this.pendingStart = 0;
    this.pendingLength = 0;
  }

  /** Source time (samples since the stream began) of the next sample rendered. */
  get clock() {
    return this.clockBase + this.outputs * this.resampler.step;
  }

  get lastPart() {
    return this.parts.length ? this.parts[this.parts.length - 1] : null;
  }

  command(message) {
    switch (message.type) {
      case 'part': {
        const last = this.lastPart;
        if (last && last.end === null) last.end = this.written;
        this.parts.push({ id: message.id, start: this.written, end: null, started: false });
        break;
      }
      case 'audio':
        this.enqueue(message.pcm);
        break;
      case 'end': {
        const last = this.lastPart;
        if (last && last.id === message.id && last.end === null) last.end = this.written;
        break;
      }
      case 'flush':
        this.flush();
        break;
    }
  }

  enqueue(buffer) {
    const view = new DataView(buffer);
    const count = buffer.byteLength >> 1;
    const room = this.ring.length - this.buffered;
    const taken = Math.min(count, room);
    this.droppedSamples += count - taken;
    let at = (this.readIndex + this.buffered) % this.ring.length;
    for (let i = 0; i < taken; i++) {
      this.ring[at] = view.getInt16(2 * i, true) / 32768;
      if (++at === this.ring.length) at = 0;
    }
    this.buffered += taken;
    this.written += taken;
  }

  flush() {
    const part = this.current >= 0 ? this.parts[this.current] : null;
    const playedMs = part ? (Math.max(0, Math.min(this.clock, part.end ?? Infinity) - part.start) * 1000) / SOURCE_RATE_HZ : 0;
    this.consumed += this.buffered;
    this.readIndex = (this.readIndex + this.buffered) % this.ring.length;
    this.buffered = 0;
    this.parts = [];
    this.current = -1;
    this.playing = false;
    this.resetClock();
    this.port.postMessage({ type: 'flushed', id: part ? part.id : null, playedMs });
    this.status();
  }

  /** Refill the output FIFO from the ring; false when the ring is empty. */
  refill() {
    const ring = this.ring;
    if (this.buffered > 0) {
      const n = Math.min(this.buffered, PULL_SOURCE_SAMPLES);
      for (let i = 0; i < n; i++) {
        this.pull[i] = ring[this.readIndex];
        if (++this.readIndex === ring.length) this.readIndex = 0;
      }
      this.buffered -= n;
      this.consumed += n;
      this.pendingStart = 0;
      this.pendingLength = this.resampler.process(this.pull.subarray(0, n), this.pending);
      return true;
    }
    return false;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    const last = this.lastPart;
    const ended = last !== null && last.end !== null;
    if (!this.playing) out.fill(0);
    if (!this.playing && this.buffered > 0) {
      const target = (this.prebufferMs * SOURCE_RATE_HZ) / 1000;
      if (this.buffered >= target || ended) this.playing = true;
    } else if (!this.playing && ended) {
      this.drained(last); // a part that ended with nothing (left) to play
    }
    if (this.playing) {
      let i = 0;
      while (i < out.length) {
        if (this.pendingLength === 0 && !this.refill()) break;
        if (this.pendingLength === 0) continue;
        const x = this.pending[this.pendingStart++];
        this.pendingLength--;
        out[i++] = x;
        this.outputs++;
        this.playedSamples++;
        this.playedSumSquares += x * x;
      }
      this.advanceParts();
      if (i < out.length) {
        out.fill(0, i);
        // Ran dry inside this quantum.
        this.playing = false;
        if (ended && this.buffered === 0) {
          this.drained(last);
        } else {
          this.underruns++;
          this.prebufferMs = Math.min(PLAYBACK_PREBUFFER_MAX_MS, this.prebufferMs + PLAYBACK_PREBUFFER_STEP_MS);
          this.status();
        }
      }
    }
    if (++this.quanta % STATUS_INTERVAL_QUANTA === 0) this.status();
    return true;
  }

  /** Everything queued has played and the last part has ended: the stream is over. */
  drained(last) {
    this.status(); // the final counts reach the page before the news that it is over
    this.port.postMessage({ type: 'drained', id: last.id });
    this.parts = [];
    this.current = -1;
    this.resetClock();
  }

  /** Announce each part whose first sample has now been rendered. */
  advanceParts() {
    const clock = this.clock;
    while (this.current + 1 < this.parts.length && this.parts[this.current + 1].start < clock) {
      this.current++;
      const part = this.parts[this.current];
      if (!part.started) {
        part.started = true;
        this.port.postMessage({ type: 'started', id: part.id });
      }
    }
  }

  status() {
    this.port.postMessage({
      type: 'status',
      playedSamples: this.playedSamples,
      playedSumSquares: this.playedSumSquares,
      bufferedMs: (this.buffered * 1000) / SOURCE_RATE_HZ,
      underruns: this.underruns,
      droppedSamples: this.droppedSamples,
      prebufferMs: this.prebufferMs,
    });
  }
}

registerProcessor('relay-playback', PlaybackProcessor);
