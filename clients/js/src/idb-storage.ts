/**
 * Storage in the browser's IndexedDB (through `idb`): an `outbox` store keyed by operation id and
 * a `meta` store holding the stream position. A write resolves once its transaction committed
 * (durability "strict" where the browser supports it), so an operation kept survives a reload
 * or a crash of the page. Every page of one origin opening the same database shares it.
 */
import { openDB, type DBSchema, type IDBPDatabase } from "idb";
import type { Storage, StoredOperation, StoredState, StreamPosition } from "./storage.js";

interface Schema extends DBSchema {
  outbox: { key: string; value: StoredOperation };
  meta: { key: string; value: StreamPosition };
}

const POSITION = "position";

export class IndexedDbStorage implements Storage {
  private db: IDBPDatabase<Schema> | null = null;

  /** `name`: the database, one per terminal (e.g. `chefia-rt:<store>:<terminal>`). */
  constructor(readonly name: string) {}

  private async open(): Promise<IDBPDatabase<Schema>> {
    if (!this.db) {
      this.db = await openDB<Schema>(this.name, 1, {
        upgrade(db) {
          db.createObjectStore("outbox", { keyPath: "id" });
          db.createObjectStore("meta");
        },
      });
    }
    return this.db;
  }

  async load(): Promise<StoredState> {
    const db = await this.open();
    const outbox = (await db.getAll("outbox")).sort((a, b) => a.order - b.order);
    const position = (await db.get("meta", POSITION)) ?? { watermark: null, epoch: null };
    return { outbox, watermark: position.watermark, epoch: position.epoch };
  }

  async putOperation(op: StoredOperation): Promise<void> {
    const db = await this.open();
    const tx = db.transaction("outbox", "readwrite", { durability: "strict" });
    await Promise.all([tx.store.put(op), tx.done]);
  }

  async deleteOperations(ids: string[]): Promise<void> {
    const db = await this.open();
    const tx = db.transaction("outbox", "readwrite");
    await Promise.all([...ids.map((id) => tx.store.delete(id)), tx.done]);
  }

  async setPosition(position: StreamPosition): Promise<void> {
    const db = await this.open();
    await db.put("meta", { ...position }, POSITION);
  }

  async close(): Promise<void> {
    this.db?.close();
    this.db = null;
  }
}
