// PCM16 and base64 helpers for the page's main thread.
//
// Owns the byte-level conversions of the plain JSON path (base64 audio inside
// `input_audio_buffer.append` and `response.output_audio.delta`) and the sums the
// page's readouts are computed from. PCM16 is little-endian on the wire whatever
// the machine's own byte order.

/** The Realtime API's PCM16 sample rate. */
export const PCM16_RATE_HZ = 24000;
export const PCM16_BYTES_PER_SAMPLE = 2;
/** base64 is built in slices of this many bytes (String.fromCharCode's argument limit). */
const BASE64_SLICE_BYTES = 0x6000;

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** @param {ArrayBuffer} buffer */
export function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = '';
  for (let i = 0; i < bytes.length; i += BASE64_SLICE_BYTES) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + BASE64_SLICE_BYTES));
  }
  return btoa(text);
}

/** @param {string} text @returns {ArrayBuffer} */
export function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes.buffer;
}

/**
 * The samples of a little-endian PCM16 buffer (a trailing odd byte is ignored).
 * @param {ArrayBuffer} buffer @returns {Int16Array}
 */
export function pcm16Samples(buffer) {
  const count = buffer.byteLength >> 1;
  if (LITTLE_ENDIAN) return new Int16Array(buffer, 0, count);
  const view = new DataView(buffer);
  const samples = new Int16Array(count);
  for (let i = 0; i < count; i++) samples[i] = view.getInt16(2 * i, true);
  return samples;
}

/**
 * Samples as little-endian PCM16 bytes, ready for the wire.
 * @param {Int16Array} samples @returns {ArrayBuffer}
 */
export function pcm16Bytes(samples) {
  if (LITTLE_ENDIAN) {
    return samples.buffer.slice(samples.byteOffset, samples.byteOffset + samples.byteLength);
  }
  const buffer = new ArrayBuffer(samples.length * 2);
  const view = new DataView(buffer);
  for (let i = 0; i < samples.length; i++) view.setInt16(2 * i, samples[i], true);
  return buffer;
}

/** Sum of squares of samples scaled to [-1, 1). @param {Int16Array} samples */
export function sumOfSquares(samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) {
    const x = samples[i] / 32768;
    sum += x * x;
  }
  return sum;
}
