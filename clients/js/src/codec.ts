/**
 * The wire encodings (docs/protocol.md §3): JSON text frames, or msgpack binary
 * frames that may hold a `message_batch` and may travel as `compressed:` + an LZ4 frame.
 */
import { decode, encode } from "@msgpack/msgpack";
import { decompressFrame } from "lz4js";

export type Message = { type: string; [key: string]: unknown };
export type Encoding = "json" | "msgpack";

export const BATCH_TYPE = "message_batch";
const COMPRESSED_PREFIX = new TextEncoder().encode("compressed:");

/** A frame the client cannot read: the connection is started over. */
export class FrameError extends Error {
  constructor(
    message: string,
    readonly tooBig = false,
  ) {
    super(message);
    this.name = "FrameError";
  }
}

function hasPrefix(bytes: Uint8Array, prefix: Uint8Array): boolean {
  if (bytes.length < prefix.length) return false;
  for (let i = 0; i < prefix.length; i++) if (bytes[i] !== prefix[i]) return false;
  return true;
}

/** Inflates one LZ4 frame, refusing more than `maxSize` bytes of content. */
export function inflate(payload: Uint8Array, maxSize: number): Uint8Array {
  const out = new Uint8Array(maxSize + 1);
  let size: number;
  try {
    size = decompressFrame(payload, out);
  } catch (err) {
    throw new FrameError(`bad lz4 frame: ${(err as Error).message}`);
  }
  if (size > maxSize) throw new FrameError(`compressed frame inflates beyond ${maxSize} bytes`, true);
  return out.subarray(0, size);
}

/** One WebSocket frame's messages (a `message_batch` unpacked). */
export function decodeFrame(frame: string | ArrayBuffer | Uint8Array, maxSize: number): Message[] {
  let decoded: unknown;
  if (typeof frame === "string") {
    if (frame.length > maxSize) throw new FrameError(`frame of ${frame.length} chars exceeds ${maxSize}`, true);
    try {
      decoded = JSON.parse(frame);
    } catch (err) {
      throw new FrameError(`undecodable JSON frame: ${(err as Error).message}`);
    }
  } else {
    let bytes = frame instanceof Uint8Array ? frame : new Uint8Array(frame);
    if (bytes.length > maxSize) throw new FrameError(`frame of ${bytes.length} bytes exceeds ${maxSize}`, true);
    if (hasPrefix(bytes, COMPRESSED_PREFIX)) bytes = inflate(bytes.subarray(COMPRESSED_PREFIX.length), maxSize);
    try {
      decoded = decode(bytes);
    } catch (err) {
      throw new FrameError(`undecodable msgpack frame: ${(err as Error).message}`);
    }
  }
  if (!isMessage(decoded)) throw new FrameError("a frame must hold one object with a type");
  if (decoded.type !== BATCH_TYPE) return [decoded];
  const messages = decoded["messages"];
  if (!Array.isArray(messages) || !messages.every(isMessage)) {
    throw new FrameError("message_batch.messages must be a list of messages");
  }
  return messages;
}

function isMessage(value: unknown): value is Message {
  return typeof value === "object" && value !== null && !Array.isArray(value) && typeof (value as Message).type === "string";
}

/** Frames for `messages`: one per message in JSON; in msgpack one alone, several as a batch. */
export function encodeFrames(messages: Message[], encoding: Encoding): (string | Uint8Array)[] {
  if (encoding === "json") return messages.map((m) => JSON.stringify(m));
  if (messages.length === 1) return [encode(messages[0])];
  return [encode({ type: BATCH_TYPE, messages, count: messages.length })];
}

/** Throws (TypeError, RangeError) when `message` cannot travel in `encoding`. */
export function checkEncodable(message: Message, encoding: Encoding): void {
  if (encoding === "json") {
    const text = JSON.stringify(message, (_key, value: unknown) => {
      if (typeof value === "number" && !Number.isFinite(value)) throw new RangeError("numbers must be finite");
      if (typeof value === "bigint") throw new TypeError("bigint values cannot travel in JSON");
      return value;
    });
    if (text === undefined) throw new TypeError("the operation is not JSON");
  } else {
    encode(message);
  }
}
