// A streaming band-limited resampler (windowed sinc), shared by both audio worklets.
//
// Owns sample-rate conversion between the AudioContext's rate (48 kHz, 44.1 kHz, ...)
// and the Realtime API's 24 kHz: the microphone down to 24 kHz in
// capture-worklet.js, the answer up to the context rate in playback-worklet.js.
// Any ratio works; state (the last input samples and the fractional read position)
// is kept across blocks, so a signal cut into 128-frame render quanta comes out as
// if it had been converted in one piece. Downsampling low-passes below the output
// rate's Nyquist frequency first (no aliasing); the kernel is normalised to unit
// DC gain. No allocation after construction unless a block is larger than any
// before.

/** Taps on each side of the interpolation point, counted at the lower of the two rates. */
export const RESAMPLER_HALF_TAPS = 24;
/** Fractional positions the kernel is tabulated at (timing error < 1/1024 sample). */
export const RESAMPLER_PHASES = 512;
/** Passband as a fraction of the lower rate's Nyquist frequency. */
export const RESAMPLER_PASSBAND = 0.9;

function blackman(x, half) {
  // x in [-half, half]
  const t = Math.PI * x / half;
  return 0.42 + 0.5 * Math.cos(t) + 0.08 * Math.cos(2 * t);
}

export class Resampler {
  /**
   * @param {number} inputRateHz
   * @param {number} outputRateHz
   */
  constructor(inputRateHz, outputRateHz, halfTaps = RESAMPLER_HALF_TAPS, phases = RESAMPLER_PHASES) {
    if (!(inputRateHz > 0 && outputRateHz > 0)) throw new RangeError('sample rates must be > 0');
    this.inputRateHz = inputRateHz;
    this.outputRateHz = outputRateHz;
    /** Input samples advanced per output sample. */
    this.step = inputRateHz / outputRateHz;
    const ratio = Math.min(1, outputRateHz / inputRateHz);
    // Downsampling: the filter spans as many output samples as upsampling's does.
    halfTaps = Math.ceil(halfTaps / ratio);
    this.halfTaps = halfTaps;
    this.phases = phases;
    const taps = 2 * halfTaps;
    // Cutoff relative to the input's Nyquist frequency.
    const cutoff = ratio * RESAMPLER_PASSBAND;
    // Row p holds the taps for an output at fraction p/phases past input index i0,
    // applied to inputs i0 - halfTaps + 1 ... i0 + halfTaps.
    this.kernel = new Float32Array((phases + 1) * taps);
    for (let p = 0; p <= phases; p++) {
      const frac = p / phases;
      let sum = 0;
      for (let k = 0; k < taps; k++) {
        const x = k - (halfTaps - 1) - frac; // distance of the tap from the output point
        const u = cutoff * x;
        const sinc = u === 0 ? 1 : Math.sin(Math.PI * u) / (Math.PI * u);
        const w = Math.abs(x) >= halfTaps ? 0 : blackman(x, halfTaps);
        const h = cutoff * sinc * w;
        this.kernel[p * taps + k] = h;
        sum += h;
      }
      for (let k = 0; k < taps; k++) this.kernel[p * taps + k] /= sum;
    }
    this.buffer = new Float32Array(taps + 1024);
    this.reset();
  }

  /** Forget the signal: the next block starts from silence. */
  reset() {
    // halfTaps - 1 samples of silence before the first input; the first output
    // sample lands on the first input sample.
    this.buffer.fill(0);
    this.length = this.halfTaps - 1;
    this.position = this.halfTaps - 1;
  }

  /** The most output samples `process` can return for `inputLength` input samples. */
  maxOutput(inputLength) {
    return Math.ceil((inputLength + 2 * this.halfTaps) / this.step) + 2;
  }

  /**
   * Convert one block. Writes the outputs into `out` from index 0 and returns how
   * many; `out` must hold `maxOutput(input.length)`.
   * @param {Float32Array} input
   * @param {Float32Array} out
   * @returns {number}
   */
  process(input, out) {
    const needed = this.length + input.length;
    if (needed > this.buffer.length) {
      const grown = new Float32Array(needed * 2);
      grown.set(this.buffer.subarray(0, this.length));
      this.buffer = grown;
    }
    this.buffer.set(input, this.length);
    this.length = needed;
    const { buffer, kernel, halfTaps, phases, step } = this;
    const taps = 2 * halfTaps;
    let position = this.position;
    let count = 0;
    while (Math.floor(position) + halfTaps < this.length) {
      const i0 = Math.floor(position);
      const row = Math.round((position - i0) * phases) * taps;
      const first = i0 - halfTaps + 1;
      let acc = 0;
      for (let k = 0; k < taps; k++) acc += buffer[first + k] * kernel[row + k];
      out[count++] = acc;
      position += step;
    }
    // Keep only what the next output still needs.
    const keep = Math.floor(position) - halfTaps + 1;
    if (keep > 0) {
      buffer.copyWithin(0, keep, this.length);
      this.length -= keep;
      position -= keep;
    }
    this.position = position;
    return count;
  }

  /** Input samples inside the converter that have not reached the output yet. */
  get pendingInput() {
    return Math.max(0, this.length - Math.floor(this.position));
  }
}
