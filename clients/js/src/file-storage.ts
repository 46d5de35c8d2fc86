/**
 * Storage in one file (Node): a journal of JSON lines, each a change (an operation kept, some
 * forgotten, the stream position). An operation's line is flushed to the disk (fdatasync)
 * before `putOperation` resolves; a line torn by a crash is the last one, and is ignored. The
 * journal is rewritten (into a new file renamed over it) when loaded and when it grows long.
 * One client at a time may use a file.
 */
import { open, rename, readFile, type FileHandle } from "node:fs/promises";
import type { Storage, StoredOperation, StoredState, StreamPosition } from "./storage.js";

type Line = { put: StoredOperation } | { del: string[] } | { pos: StreamPosition };

export class FileStorage implements Storage {
  private handle: FileHandle | null = null;
  private readonly ops = new Map<string, StoredOperation>();
  private position: StreamPosition = { watermark: null, epoch: null };
  private lines = 0;
  private queue: Promise<unknown> = Promise.resolve();

  /** `path`: the journal file, created if missing. */
  constructor(readonly path: string) {}

  async load(): Promise<StoredState> {
    await this.serial(async () => {
      let text = "";
      try {
        text = await readFile(this.path, "utf8");
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
      }
      this.ops.clear();
      for (const raw of text.split("\n")) {
        if (!raw) continue;
        let line: Line;
        try {
          line = JSON.parse(raw) as Line;
        } catch {
          continue; // a line torn by a crash mid-write
        }
        if ("put" in line) this.ops.set(line.put.id, line.put);
        else if ("del" in line) for (const id of line.del) this.ops.delete(id);
        else if ("pos" in line) this.position = line.pos;
      }
      await this.compact();
    });
    const outbox = [...this.ops.values()].sort((a, b) => a.order - b.order);
    return { outbox, ...this.position };
  }

  putOperation(op: StoredOperation): Promise<void> {
    return this.serial(async () => {
      this.ops.set(op.id, op);
      await this.append({ put: op }, true);
    });
  }

  deleteOperations(ids: string[]): Promise<void> {
    return this.serial(async () => {
      for (const id of ids) this.ops.delete(id);
      // Not flushed: lost in a crash, the operation is sent again and answered `duplicate`.
      await this.append({ del: ids }, false);
    });
  }

  setPosition(position: StreamPosition): Promise<void> {
    return this.serial(async () => {
      this.position = { ...position };
      await this.append({ pos: this.position }, false);
    });
  }

  close(): Promise<void> {
    return this.serial(async () => {
      if (this.handle) {
        await this.handle.sync();
        await this.handle.close();
        this.handle = null;
      }
    });
  }

  private serial<T>(work: () => Promise<T>): Promise<T> {
    const next = this.queue.then(work, work);
    this.queue = next.catch(() => undefined);
    return next;
  }

  private async append(line: Line, flush: boolean): Promise<void> {
    if (!this.handle) this.handle = await open(this.path, "a");
    await this.handle.write(JSON.stringify(line) + "\n");
    if (flush) await this.handle.datasync();
    this.lines += 1;
    if (this.lines > 2 * this.ops.size + 1000) await this.compact();
  }

  /** Rewrites the journal as the state it describes. */
  private async compact(): Promise<void> {
    const text =
      [...this.ops.values()].map((op) => JSON.stringify({ put: op })).join("\n") +
      (this.ops.size ? "\n" : "") +
      JSON.stringify({ pos: this.position }) +
      "\n";
    const fresh = `${this.path}.new`;
    const handle = await open(fresh, "w");
    try {
      await handle.write(text);
      await handle.sync();
    } finally {
      await handle.close();
    }
    if (this.handle) {
      await this.handle.close();
      this.handle = null;
    }
    await rename(fresh, this.path);
    this.lines = this.ops.size + 1;
  }
}
