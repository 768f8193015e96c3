// The microphone side of the page, on the audio rendering thread.
//
// Owns turning the microphone's render quanta (128 frames at the AudioContext's
// rate, one or more channels) into the Realtime API's input: mono, 24 kHz,
// PCM16 little-endian, cut into CAPTURE_CHUNK_SAMPLES chunks that the page sends
// as they are (a binary frame each on the relay.audio.v1 path, an
// input_audio_buffer.append on the JSON path).
//
// The resampler runs on every quantum, talking or not, so its state (history and
// fractional position) is continuous: a chunk boundary or the start of a turn is
// never a discontinuity in the converted signal.
//
// Messages from the page:  {type: 'start'}  start sending chunks;
//                          {type: 'stop'}   send the partial chunk, then {type: 'stopped'}.
// Messages to the page:    {type: 'audio', pcm: ArrayBuffer}  one chunk (transferred);
//                          {type: 'stopped', samples}         the turn's last chunk is out;
//                          {type: 'level', rms}               every LEVEL_INTERVAL_QUANTA.

import { Resampler } from './resampler.js';

/** The Realtime API's input rate. */
const TARGET_RATE_HZ = 24000;
/** 20 ms at 24 kHz: 960 bytes per chunk, the size OpenAI's own clients send. */
const CAPTURE_CHUNK_SAMPLES = 480;
/** The level meter is refreshed every this many render quanta (about 50 ms at 48 kHz). */
const LEVEL_INTERVAL_QUANTA = 19;
const RENDER_QUANTUM_FRAMES = 128;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate, TARGET_RATE_HZ);
    this.mono = new Float32Array(RENDER_QUANTUM_FRAMES);
    this.converted = new Float32Array(this.resampler.maxOutput(RENDER_QUANTUM_FRAMES));
    this.chunk = new ArrayBuffer(CAPTURE_CHUNK_SAMPLES * 2);
    this.view = new DataView(this.chunk);
    this.filled = 0;
    this.active = false;
    this.turnSamples = 0;
    this.levelSum = 0;
    this.levelCount = 0;
    this.quanta = 0;
    this.port.onmessage = (event) => this.command(event.data);
  }

  command(message) {
    if (message.type === 'start') {
      this.active = true;
      this.filled = 0;
      this.turnSamples = 0;
    } else if (message.type === 'stop' && this.active) {
      this.active = false;
      this.send();
      this.port.postMessage({ type: 'stopped', samples: this.turnSamples });
    }
  }

  send() {
    if (this.filled === 0) return;
    const pcm = this.chunk.slice(0, this.filled * 2);
    this.filled = 0;
    this.port.postMessage({ type: 'audio', pcm }, [pcm]);
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // no microphone connected yet
    const frames = channels[0].length;
    const mono = frames === this.mono.length ? this.mono : new Float32Array(frames);
    if (channels.length === 1) {
      mono.set(channels[0]);
    } else {
      mono.fill(0);
      for (const channel of channels) for (let i = 0; i < frames; i++) mono[i] += channel[i];
      for (let i = 0; i < frames; i++) mono[i] /= channels.length;
    }
    if (this.converted.length < this.resampler.maxOutput(frames)) {
      this.converted = new Float32Array(this.resampler.maxOutput(frames));
    }
    const count = this.resampler.process(mono, this.converted);
    for (let i = 0; i < count; i++) {
      const x = Math.max(-1, Math.min(1, this.converted[i]));
      this.levelSum += x * x;
      if (!this.active) continue;
      this.view.setInt16(this.filled * 2, Math.round(x * 32767), true);
      this.filled++;
      this.turnSamples++;
      if (this.filled === CAPTURE_CHUNK_SAMPLES) this.send();
    }
    this.levelCount += count;
    if (++this.quanta % LEVEL_INTERVAL_QUANTA === 0) {
      const rms = this.levelCount ? Math.sqrt(this.levelSum / this.levelCount) : 0;
      this.port.postMessage({ type: 'level', rms });
      this.levelSum = 0;
      this.levelCount = 0;
    }
    return true;
  }
}

registerProcessor('relay-capture', CaptureProcessor);
