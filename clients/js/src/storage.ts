/**
 * Where a client keeps what must survive a reload: the operations not yet answered (the outbox)
 * and the stream position (watermark and epoch). `MemoryStorage` keeps them for the life of the
 * object (tests, or a terminal that may lose them); `FileStorage` (Node, from "./node") and
 * `IndexedDbStorage` (browsers) keep them on disk.
 */
import type { Message } from "./codec.js";

/** One operation of the outbox: its `data_sync` message as first sent, and its place in order. */
export interface StoredOperation {
  id: string;
  order: number;
  message: Message;
}

export interface StreamPosition {
  /** The highest store seq up to which the application was handed everything. */
  watermark: number | null;
  /** The epoch of the store's seq stream the watermark belongs to. */
  epoch: string | null;
}

export interface StoredState extends StreamPosition {
  /** In send order. */
  outbox: StoredOperation[];
}

export interface Storage {
  /** Everything kept so far (an empty outbox and null position the first time). */
  load(): Promise<StoredState>;
  /** Keeps one operation; resolved only once it would survive a reload. */
  putOperation(op: StoredOperation): Promise<void>;
  /** Forgets answered operations. */
  deleteOperations(ids: string[]): Promise<void>;
  /** Keeps the stream position. */
  setPosition(position: StreamPosition): Promise<void>;
  close(): Promise<void>;
}

/** Kept in memory only: what a test or a throwaway terminal needs. Two clients given the same
 * MemoryStorage one after the other share it, as two page loads share an IndexedDB. */
export class MemoryStorage implements Storage {
  private readonly ops = new Map<string, StoredOperation>();
  private position: StreamPosition = { watermark: null, epoch: null };

  async load(): Promise<StoredState> {
    const outbox = [...this.ops.values()].sort((a, b) => a.order - b.order).map((op) => structuredClone(op));
    return { outbox, ...this.position };
  }

  async putOperation(op: StoredOperation): Promise<void> {
    this.ops.set(op.id, structuredClone(op));
  }

  async deleteOperations(ids: string[]): Promise<void> {
    for (const id of ids) this.ops.delete(id);
  }

  async setPosition(position: StreamPosition): Promise<void> {
    this.position = { ...position };
  }

  async close(): Promise<void> {}
}
