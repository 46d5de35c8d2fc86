/**
 * @chefia/rt-client: the terminal client of chefia-rt for browsers (and, from
 * "@chefia/rt-client/node", for Node with a file outbox). See ../README.md.
 */
export {
  Client,
  ClientStoppedError,
  DEFAULT_BACKOFF,
  FATAL_CLOSES,
  LockFailedError,
  NotConnectedError,
  OperationRejectedError,
  OutboxFullError,
  RETRY_CODES,
  backoffDelay,
  browserSocket,
} from "./client.js";
export type {
  Answer,
  Backoff,
  ClientOptions,
  ClientStats,
  OperationKind,
  Queued,
  SendOptions,
  Snapshot,
  SocketFactory,
  SocketLike,
  StoreEvent,
  StoreOp,
  TerminalType,
} from "./client.js";
export { decodeFrame, encodeFrames, FrameError } from "./codec.js";
export type { Encoding, Message } from "./codec.js";
export { MemoryStorage } from "./storage.js";
export type { Storage, StoredOperation, StoredState, StreamPosition } from "./storage.js";
export { IndexedDbStorage } from "./idb-storage.js";
