// One Realtime session over a WebSocket to the relay, binary audio path or plain JSON.
//
// Owns the wire: the subprotocol offer and what the relay selected, how audio goes
// up (a binary frame per chunk on relay.audio.v1, a base64 input_audio_buffer.append
// otherwise) and comes down (binary frames after a relay.output_audio.start marker,
// or JSON response.output_audio.delta events), and turning both into the same
// calls: onAudioPart(key, ids), onAudio(ArrayBuffer), onEvent(event).
//
// The binary path is offered as ["realtime", "relay.audio.v1",
// "openai-insecure-api-key." + token]; the session uses it only if the relay
// selected it (ws.protocol === "relay.audio.v1") and falls back to JSON otherwise.
// The JSON path offers ["realtime", "openai-insecure-api-key." + token], the form
// OpenAI's own browser clients use. See docs/binary-audio.md.

import { fromBase64, toBase64 } from './pcm.js';

export const BINARY_SUBPROTOCOL = 'relay.audio.v1';
const CREDENTIAL_PREFIX = 'openai-insecure-api-key.';
/** Mic chunks are dropped (and counted) while this much is queued unsent in the socket. */
const MAX_UNSENT_BYTES = 256 * 1024;

/** The key of a content part's audio stream. */
export function partKey(event) {
  return `${event.response_id}/${event.item_id}/${event.output_index}/${event.content_index}`;
}

export class RealtimeSession {
  /**
   * @param {{url: string, token: string, binary: boolean}} options
   */
  constructor({ url, token, binary }) {
    this.url = url;
    this.offered = binary
      ? ['realtime', BINARY_SUBPROTOCOL, CREDENTIAL_PREFIX + token]
      : ['realtime', CREDENTIAL_PREFIX + token];
    this.wantBinary = binary;
    this.binary = false;
    this.protocol = '';
    this.ws = null;
    this.currentPart = null; // {key, ids} of the audio now arriving
    this.bytesSent = 0;
    this.bytesReceived = 0;
    this.audioBytesReceived = 0;
    this.chunksDropped = 0;
    this.onEvent = () => {};
    this.onAudioPart = () => {};
    this.onAudio = () => {};
    this.onClose = () => {};
  }

  /** Open the socket; resolves once the relay has answered the upgrade. */
  open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url, this.offered);
      ws.binaryType = 'arraybuffer';
      this.ws = ws;
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this.protocol = ws.protocol;
        this.binary = ws.protocol === BINARY_SUBPROTOCOL;
        resolve(this);
      };
      ws.onmessage = (message) => this.receive(message.data);
      ws.onclose = (event) => {
        if (!opened) {
          reject(new Error(`the relay refused the session (WebSocket closed ${event.code})`));
        }
        this.onClose(event);
      };
      ws.onerror = () => {}; // the close event that follows carries what there is to know
    });
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** @param {object} event a client event */
  send(event) {
    if (!this.isOpen) return;
    const text = JSON.stringify(event);
    this.bytesSent += text.length;
    this.ws.send(text);
  }

  /** One chunk of PCM16 microphone audio. @param {ArrayBuffer} pcm */
  sendAudio(pcm) {
    if (!this.isOpen) return false;
    if (this.ws.bufferedAmount > MAX_UNSENT_BYTES) {
      this.chunksDropped++;
      return false;
    }
    if (this.binary) {
      this.bytesSent += pcm.byteLength;
      this.ws.send(pcm);
    } else {
      this.send({ type: 'input_audio_buffer.append', audio: toBase64(pcm) });
    }
    return true;
  }

  receive(data) {
    if (typeof data !== 'string') {
      // relay.audio.v1: audio of the part the last marker named.
      this.bytesReceived += data.byteLength;
      this.audioBytesReceived += data.byteLength;
      if (this.currentPart) this.onAudio(data, this.currentPart);
      return;
    }
    this.bytesReceived += data.length;
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    if (event.type === 'relay.output_audio.start') {
      this.beginPart(event);
      return;
    }
    if (event.type === 'response.output_audio.delta') {
      // The JSON path, or a delta the relay could not convert (docs/binary-audio.md §3).
      if (!this.currentPart || this.currentPart.key !== partKey(event)) this.beginPart(event);
      const pcm = fromBase64(event.delta);
      this.audioBytesReceived += pcm.byteLength;
      this.onAudio(pcm, this.currentPart);
      return;
    }
    if (event.type === 'response.output_audio.done' && this.currentPart && this.currentPart.key === partKey(event)) {
      this.onEvent(event);
      this.currentPart = null;
      return;
    }
    this.onEvent(event);
  }

  beginPart(event) {
    const ids = {
      response_id: event.response_id,
      item_id: event.item_id,
      output_index: event.output_index,
      content_index: event.content_index,
    };
    this.currentPart = { key: partKey(event), ids };
    this.onAudioPart(this.currentPart);
  }

  close() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, 'page closed');
  }
}
