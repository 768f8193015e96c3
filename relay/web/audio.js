// The page's audio graph: microphone -> capture worklet, playback worklet -> speakers.
//
// Owns the AudioContext and the two AudioWorkletNodes, and the page-side halves
// of their message protocols (see capture-worklet.js and playback-worklet.js).
// The context runs at whatever rate the device has (48 kHz, 44.1 kHz, ...); the
// worklets convert to and from the Realtime API's 24 kHz themselves, so nothing
// here relies on AudioContext({sampleRate: 24000}).

/** Microphone processing the browser applies unless the page is asked not to. */
const DEFAULT_PROCESSING = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };

export class AudioEngine extends EventTarget {
  /**
   * @param {{sampleRateHz?: number, processing?: boolean}} options
   *   sampleRateHz: force the context's rate (tests); processing: false turns off
   *   echo cancellation, noise suppression and gain control (a measured signal).
   */
  static async open({ sampleRateHz, processing = true } = {}) {
    const context = new AudioContext(sampleRateHz ? { sampleRate: sampleRateHz, latencyHint: 'interactive' } : { latencyHint: 'interactive' });
    // Created in a click handler it runs; some browsers still start it suspended.
    if (context.state === 'suspended') await context.resume();
    await Promise.all([
      context.audioWorklet.addModule(new URL('./capture-worklet.js', import.meta.url)),
      context.audioWorklet.addModule(new URL('./playback-worklet.js', import.meta.url)),
    ]);
    const constraints = processing
      ? DEFAULT_PROCESSING
      : { echoCancellation: false, noiseSuppression: false, autoGainControl: false };
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, ...constraints } });
    } catch (error) {
      await context.close();
      throw error;
    }
    return new AudioEngine(context, stream);
  }

  constructor(context, stream) {
    super();
    this.context = context;
    this.stream = stream;
    this.source = context.createMediaStreamSource(stream);
    // No outputs: the node is a sink, rendered for as long as it lives.
    this.capture = new AudioWorkletNode(context, 'relay-capture', { numberOfInputs: 1, numberOfOutputs: 0 });
    this.playback = new AudioWorkletNode(context, 'relay-playback', {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
    });
    this.source.connect(this.capture);
    this.playback.connect(context.destination);
    this.onChunk = null; // (ArrayBuffer) => void
    this.level = 0;
    this.playStatus = { playedSamples: 0, playedSumSquares: 0, bufferedMs: 0, underruns: 0, droppedSamples: 0, prebufferMs: 0 };
    this.stopWaiters = [];
    this.flushWaiters = [];
    this.capture.port.onmessage = (event) => this.fromCapture(event.data);
    this.playback.port.onmessage = (event) => this.fromPlayback(event.data);
  }

  get sampleRateHz() {
    return this.context.sampleRate;
  }

  fromCapture(message) {
    if (message.type === 'audio') {
      if (this.onChunk) this.onChunk(message.pcm);
    } else if (message.type === 'level') {
      this.level = message.rms;
      this.dispatchEvent(new CustomEvent('level', { detail: message.rms }));
    } else if (message.type === 'stopped') {
      for (const resolve of this.stopWaiters.splice(0)) resolve(message.samples);
    }
  }

  fromPlayback(message) {
    if (message.type === 'status') {
      this.playStatus = message;
      this.dispatchEvent(new CustomEvent('status', { detail: message }));
    } else if (message.type === 'flushed') {
      for (const resolve of this.flushWaiters.splice(0)) resolve(message);
    } else {
      // 'started' and 'drained', with the part id.
      this.dispatchEvent(new CustomEvent(message.type, { detail: message.id }));
    }
  }

  /** Start sending microphone chunks to `onChunk`. */
  startTalking() {
    this.capture.port.postMessage({ type: 'start' });
  }

  /** Stop; resolves (with the turn's sample count) once the last chunk went to `onChunk`. */
  stopTalking() {
    return new Promise((resolve) => {
      this.stopWaiters.push(resolve);
      this.capture.port.postMessage({ type: 'stop' });
    });
  }

  /** The audio that follows belongs to part `id`. */
  startPart(id) {
    this.playback.port.postMessage({ type: 'part', id });
  }

  /** Queue PCM16 (24 kHz, little-endian) for playback; the buffer is transferred. */
  play(pcm) {
    this.playback.port.postMessage({ type: 'audio', pcm }, [pcm]);
  }

  /** Part `id` has all its audio: play what is left of it even below the prebuffer. */
  endPart(id) {
    this.playback.port.postMessage({ type: 'end', id });
  }

  /** Stop playback now; resolves with {id, playedMs} of the part that was cut. */
  flush() {
    return new Promise((resolve) => {
      this.flushWaiters.push(resolve);
      this.playback.port.postMessage({ type: 'flush' });
    });
  }

  async close() {
    for (const track of this.stream.getTracks()) track.stop();
    await this.context.close();
  }
}
