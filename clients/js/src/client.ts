/**
 * The terminal client: one terminal's WebSocket to chefia-rt, kept alive across faults, with
 * the promises of the Python client (docs/clients.md, docs/protocol.md):
 *
 * - Nothing sent is lost, across reloads: an operation is written to the Storage before it goes
 *   on the wire and stays there until the server answers it. After every reconnect, and in a
 *   new client on the same storage, every unanswered operation is sent again with its original
 *   id (a repeat is answered `duplicate`, which is a confirmation).
 * - Every operation of the store once, in seq order: the terminal's own (from their
 *   confirmations) and the pushed ones, as one stream with a contiguous watermark, kept in the
 *   storage with the epoch so that a reload resumes with `since=` and `epoch=`.
 * - Reconnects with backoff and jitter over the URLs; stops and says why on closes retrying
 *   cannot fix; retries "not now" answers.
 * - Bounded: the outbox (OutboxFullError), the events not yet taken (past the bound the stream
 *   pauses and resumes from the watermark once they are taken), the requests waiting for an
 *   answer, the bytes waiting in the socket; every wait has a timeout.
 */
import { checkEncodable, decodeFrame, encodeFrames, FrameError, type Encoding, type Message } from "./codec.js";
import type { Storage, StoredOperation } from "./storage.js";

/** sync_error codes that mean "not now": the operation is sent again after `retryAfter`. */
export const RETRY_CODES: ReadonlySet<number> = new Set([1013, 4005, 1011]);
/** Closes that retrying cannot fix: the client stops and says why. */
export const FATAL_CLOSES: ReadonlySet<number> = new Set([1009, 4001, 4002, 4003, 4004, 4006]);
const SEND_BATCH = 100; // operations per msgpack frame when many wait (a resend after reconnect)
const TICK_MS = 100; // between checks for due resends, stuck gaps and silent connections
const MAX_BUFFERED = 1 << 20; // bytes waiting in the socket before sending pauses
const MAX_REQUESTS = 256; // lock and resolution requests waiting for an answer

export type TerminalType = "pos" | "kds" | "waiter" | "monitor";
export type OperationKind = "CREATE" | "UPDATE" | "DELETE" | "BULK_UPDATE";

/** The minimal WebSocket the client drives: the browser's, Node 22's, or `ws`'s. */
export interface SocketLike {
  binaryType: string;
  readonly bufferedAmount: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
}

/** Opens a socket to `url` (which has every query parameter but the token) with `token`. */
export type SocketFactory = (url: string, token: string | null, maxMessageSize: number) => SocketLike;

/** The standard WebSocket: the token travels as `?token=` (a browser cannot set headers). */
export const browserSocket: SocketFactory = (url, token) => {
  const Ctor = (globalThis as { WebSocket?: new (url: string) => SocketLike }).WebSocket;
  if (!Ctor) throw new Error("no WebSocket in this runtime: import the client from '@chefia/rt-client/node'");
  return new Ctor(token ? `${url}&token=${encodeURIComponent(token)}` : url);
};

export interface Backoff {
  /** Seconds before the first reconnect; then initial * factor**n, at most `maximum`. */
  initial: number;
  maximum: number;
  factor: number;
  /** Each delay is shortened by a random part of up to `jitter` of itself. */
  jitter: number;
  /** Failed attempts in a row, or seconds without a connection, that stop the client. */
  maxAttempts: number | null;
  maxElapsed: number | null;
  /** A connection that lived this long (seconds) resets the backoff. */
  stableAfter: number;
}

export const DEFAULT_BACKOFF: Backoff = {
  initial: 0.1,
  maximum: 5,
  factor: 2,
  jitter: 0.5,
  maxAttempts: null,
  maxElapsed: null,
  stableAfter: 2,
};

/** Seconds to wait before reconnect attempt number `attempt` (0 for the first). */
export function backoffDelay(backoff: Backoff, attempt: number, rand: () => number = Math.random): number {
  const base = Math.min(backoff.maximum, backoff.initial * backoff.factor ** attempt);
  return base * (1 - backoff.jitter * rand());
}

export interface ClientOptions {
  /** One base URL or several (`ws://host:8001/ws`), tried in turn. */
  urls: string | string[];
  terminalId: string;
  storeId?: string;
  terminalType?: TerminalType;
  token?: string;
  userId?: string;
  encoding?: Encoding;
  /** Where the outbox and the stream position live (MemoryStorage, FileStorage, IndexedDbStorage). */
  storage: Storage;
  backoff?: Partial<Backoff>;
  /** Operations that may wait for an answer; `send` beyond it fails with OutboxFullError. */
  outboxSize?: number;
  /** Events the application has not taken yet before the stream pauses. */
  eventsSize?: number;
  /** Seconds before an operation answered "not now" (1013, 4005, 1011) is sent again. */
  retryAfter?: number;
  /** Seconds without an answer before an operation is sent again (and lock requests fail). */
  answerTimeout?: number;
  /** Seconds a gap in the stream may stand before the client resumes from its watermark. */
  gapTimeout?: number;
  connectTimeout?: number;
  /** Seconds between pings; a connection silent for twice as long is started over. */
  keepalive?: number;
  maxMessageSize?: number;
  socket?: SocketFactory;
  rand?: () => number;
}

/** A store operation, handed over in seq order. A pushed one carries the entity's full state
 * in `operation.data`; the terminal's own carries what it sent plus `seq`, `version`, `status`. */
export interface StoreOp {
  kind: "op";
  seq: number;
  operation: Record<string, unknown>;
  own: boolean;
}

/** The store's whole state at `seq` (after resync_required); the stream goes on after it. */
export interface Snapshot {
  kind: "snapshot";
  seq: number;
  epoch: string | null;
  entities: Record<string, unknown>[];
}

export type StoreEvent = StoreOp | Snapshot;

/** The server's confirmation of one operation (`status`: applied, merged, resolved, duplicate). */
export interface Answer {
  operationId: string;
  status: string;
  seq: number | null;
  version: number | null;
  message: Message;
}

export interface SendOptions {
  operation?: OperationKind;
  /** The version the entity has after this operation (its base + 1). */
  version?: number;
  id?: string;
  timestamp?: string;
  requiresLock?: boolean;
  priority?: "low" | "medium" | "high" | "critical";
  /** Further fields of the operation. */
  fields?: Record<string, unknown>;
}

export interface Queued {
  id: string;
  /** The server's answer (rejected with OperationRejectedError or ClientStoppedError). */
  answer: Promise<Answer>;
}

export class ClientStoppedError extends Error {
  constructor(
    readonly reason: string,
    readonly code: number | null = null,
  ) {
    super(reason);
    this.name = "ClientStoppedError";
  }
}

export class OutboxFullError extends Error {
  constructor(size: number) {
    super(`the outbox holds ${size} operations waiting for an answer; wait for answers before sending more`);
    this.name = "OutboxFullError";
  }
}

export class NotConnectedError extends Error {
  constructor(what: string) {
    super(`${what} needs a live connection`);
    this.name = "NotConnectedError";
  }
}

/** An operation the server refused for good: `kind` conflict (sync_conflict: a person decides,
 * see resolveConflict) or rejected (sync_error with `code`, e.g. 4008). */
export class OperationRejectedError extends Error {
  readonly code: number | null;
  constructor(
    readonly operationId: string,
    readonly kind: "conflict" | "rejected",
    readonly response: Message,
  ) {
    const code = typeof response["code"] === "number" ? response["code"] : null;
    super(
      kind === "conflict"
        ? `operation ${operationId} conflicts (${String(response["policy"])}): resolve ${String(response["conflict_id"])}`
        : `operation ${operationId} refused with ${code}: ${String(response["error"])}`,
    );
    this.name = "OperationRejectedError";
    this.code = code;
  }

  /** The conflict to pass to resolveConflict (sync_conflict only). */
  get conflictId(): string | null {
    const id = this.response["conflict_id"];
    return typeof id === "string" ? id : null;
  }
}

export class LockFailedError extends Error {
  constructor(readonly response: Message) {
    super(`lock refused: ${String(response["reason"])}`);
    this.name = "LockFailedError";
  }
}

export interface ClientStats {
  connects: number;
  sent: number;
  resent: number;
  confirmed: number;
  duplicates: number;
  retries: number;
  rejected: number;
  resyncs: number;
  closes: Record<number, number>;
}

interface Outgoing {
  stored: StoredOperation;
  settle: ((result: Answer | Error) => void) | null; // null: sent by an earlier client
  sentAt: number | null; // null: not sent on the current connection yet
  retryAt: number | null;
  sends: number;
}

interface Request {
  resolve: (message: Message) => void;
  reject: (err: Error) => void;
  deadline: number;
}

type Listeners = {
  op: (event: StoreOp) => void;
  snapshot: (event: Snapshot) => void;
  /** Every final answer, also to operations sent before a reload (their promises are gone). */
  answer: (result: { operationId: string; answer?: Answer; error?: OperationRejectedError }) => void;
  connected: (established: Message) => void;
  disconnected: (close: { code: number; reason: string }) => void;
  stopped: (reason: ClientStoppedError) => void;
  /** Server messages for the application: token_refreshed, error, pong. */
  message: (message: Message) => void;
};

export class Client {
  readonly urls: string[];
  readonly terminalId: string;
  readonly storeId: string | null;
  readonly terminalType: TerminalType;
  readonly encoding: Encoding;
  readonly stats: ClientStats = {
    connects: 0,
    sent: 0,
    resent: 0,
    confirmed: 0,
    duplicates: 0,
    retries: 0,
    rejected: 0,
    resyncs: 0,
    closes: {},
  };
  /** The highest seq up to which the stream holds everything (null: not connected yet). */
  watermark: number | null = null;
  /** The epoch of the store's seq stream the watermark belongs to. */
  epoch: string | null = null;
  stopped: ClientStoppedError | null = null;
  established: Message | null = null;

  private token: string | null;
  private readonly userId: string | null;
  private readonly storage: Storage;
  private readonly backoff: Backoff;
  private readonly outboxSize: number;
  private readonly eventsSize: number;
  private readonly retryAfter: number;
  private readonly answerTimeout: number;
  private readonly gapTimeout: number;
  private readonly connectTimeout: number;
  private readonly keepalive: number;
  private readonly maxMessageSize: number;
  private readonly socketFactory: SocketFactory;
  private readonly rand: () => number;

  private ready: Promise<void> | null = null;
  private readonly outbox = new Map<string, Outgoing>(); // insertion order is send order
  private reserved = 0; // operations being written to the storage
  private nextOrder = 0;
  private toSend = new Set<string>();
  private control: Message[] = [];
  private readonly ahead = new Map<number, StoreEvent>();
  private stalledSince: number | null = null;
  private readonly queue: StoreEvent[] = []; // handed over, not taken yet
  private queueHead = 0;
  private paused = false; // the queue was full: the stream resumes once it drains
  private delivered: number | null = null; // the watermark of what the application took
  private deliveredEpoch: string | null = null; // and its epoch (a snapshot not taken yet may
  // already have moved `epoch` on)
  private awaitingSnapshot = false;
  private snapshotEntities: Record<string, unknown>[] = [];
  private ws: SocketLike | null = null;
  private connected = false;
  private establishedAt = 0;
  private lastReceived = 0;
  private lastPing = 0;
  private attempt = 0;
  private downSince = Date.now();
  private connectTimer: ReturnType<typeof setTimeout> | null = null;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private ticker: ReturnType<typeof setInterval> | null = null;
  private locks = new Map<string, Request>();
  private releases = new Map<string, Request[]>();
  private resolutions = new Map<string, Request>();
  private readonly listeners: { [K in keyof Listeners]: Set<Listeners[K]> } = {
    op: new Set(),
    snapshot: new Set(),
    answer: new Set(),
    connected: new Set(),
    disconnected: new Set(),
    stopped: new Set(),
    message: new Set(),
  };
  private waiters = new Set<() => void>(); // events() and waitConnected() wake-ups
  private forget: string[] = [];
  private writing: Promise<void> | null = null;
  private positionDirty = false;

  constructor(options: ClientOptions) {
    this.urls = typeof options.urls === "string" ? [options.urls] : [...options.urls];
    if (this.urls.length === 0) throw new TypeError("at least one URL is needed");
    if (!/^[A-Za-z0-9._:-]{1,64}$/.test(options.terminalId)) {
      throw new TypeError(`invalid terminal id ${JSON.stringify(options.terminalId)}: 1-64 of A-Z a-z 0-9 . _ : -`);
    }
    if (!options.storage) throw new TypeError("a storage is needed (MemoryStorage, FileStorage, IndexedDbStorage)");
    this.terminalId = options.terminalId;
    this.storeId = options.storeId ?? null;
    this.terminalType = options.terminalType ?? "pos";
    this.token = options.token ?? null;
    this.userId = options.userId ?? null;
    this.encoding = options.encoding ?? "msgpack";
    if (this.encoding !== "json" && this.encoding !== "msgpack") {
      throw new TypeError(`encoding must be json or msgpack, not ${String(this.encoding)}`);
    }
    this.storage = options.storage;
    this.backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
    this.outboxSize = positive("outboxSize", options.outboxSize ?? 1000);
    this.eventsSize = positive("eventsSize", options.eventsSize ?? 10_000);
    this.retryAfter = positive("retryAfter", options.retryAfter ?? 1);
    this.answerTimeout = positive("answerTimeout", options.answerTimeout ?? 30);
    this.gapTimeout = positive("gapTimeout", options.gapTimeout ?? 10);
    this.connectTimeout = positive("connectTimeout", options.connectTimeout ?? 10);
    this.keepalive = positive("keepalive", options.keepalive ?? 20);
    this.maxMessageSize = positive("maxMessageSize", options.maxMessageSize ?? 1 << 20);
    this.socketFactory = options.socket ?? browserSocket;
    this.rand = options.rand ?? Math.random;
  }

  // ---- life cycle ------------------------------------------------------------------------

  /** Loads the storage (the outbox to resend, the position to resume from) and connects, in
   * the background from then on. Resolves once loaded. */
  start(): Promise<void> {
    if (!this.ready) {
      this.ready = (async () => {
        const state = await this.storage.load();
        this.watermark = this.delivered = state.watermark;
        this.epoch = this.deliveredEpoch = state.epoch;
        for (const stored of state.outbox) {
          this.outbox.set(stored.id, { stored, settle: null, sentAt: null, retryAt: null, sends: 1 });
          this.nextOrder = Math.max(this.nextOrder, stored.order + 1);
        }
        if (!this.stopped) this.connect();
      })();
    }
    return this.ready;
  }

  /** Stops: closes the connection, rejects the answers still awaited with ClientStoppedError,
   * writes what is pending to the storage and closes it. Unanswered operations stay there. */
  async close(): Promise<void> {
    this.stop(new ClientStoppedError("closed by the application"));
    await this.ready?.catch(() => undefined);
    await this.persisted();
    await this.storage.close();
  }

  /** Resolves once everything the client has to write to the storage is written (answered
   * operations forgotten, the position of the events taken so far). */
  async persisted(): Promise<void> {
    this.flushPosition();
    while (this.writing) await this.writing;
  }

  get isConnected(): boolean {
    return this.connected;
  }

  /** Resolves once connected; rejects with ClientStoppedError, or an Error after `timeoutMs`. */
  waitConnected(timeoutMs: number): Promise<void> {
    return this.waitFor(() => this.connected, timeoutMs, "a connection");
  }

  /** Resolves with why the client stopped by itself (a takeover, a fatal close, giving up). */
  async waitStopped(timeoutMs: number): Promise<ClientStoppedError> {
    await this.waitFor(() => this.stopped !== null, timeoutMs, "the client to stop", false);
    return this.stopped!;
  }

  /** The operations still waiting for an answer, in send order. */
  unanswered(): Record<string, unknown>[] {
    return [...this.outbox.values()].map((o) => o.stored.message["operation"] as Record<string, unknown>);
  }

  on<K extends keyof Listeners>(type: K, listener: Listeners[K]): () => void {
    const set = this.listeners[type] as Set<Listeners[K]>;
    set.add(listener);
    if (type === "op" || type === "snapshot") queueMicrotask(() => this.drain());
    return () => set.delete(listener);
  }

  private stop(reason: ClientStoppedError): void {
    if (this.stopped) return;
    this.stopped = reason;
    for (const outgoing of this.outbox.values()) {
      outgoing.settle?.(reason);
      outgoing.settle = null;
    }
    this.failRequests(reason);
    this.clearTimers();
    const ws = this.ws;
    if (ws) {
      ws.close(1000, "closed by the application");
      this.dropSocket(ws);
    }
    this.connected = false;
    for (const listener of this.listeners.stopped) listener(reason);
    this.wake();
  }

  // ---- the application's side ------------------------------------------------------------

  /** Keeps the operation in the storage, sends it, and resolves with the server's answer. */
  async send(entityType: string, entityId: string, data: Record<string, unknown>, options: SendOptions = {}): Promise<Answer> {
    const queued = await this.enqueue(entityType, entityId, data, options);
    return queued.answer;
  }

  /** Like send, but resolves as soon as the operation is kept in the storage (it then survives
   * a reload), with its id and the promise of its answer. */
  async enqueue(entityType: string, entityId: string, data: Record<string, unknown>, options: SendOptions = {}): Promise<Queued> {
    if (!this.ready) throw new Error("start() the client before sending");
    await this.ready;
    if (this.stopped) throw this.stopped;
    if (this.outbox.size + this.reserved >= this.outboxSize) throw new OutboxFullError(this.outboxSize);
    const id = options.id ?? `${this.terminalId}-${randomId()}`;
    if (this.outbox.has(id)) throw new Error(`operation ${id} is already waiting for its answer`);
    const operation: Record<string, unknown> = {
      id,
      entity_type: entityType,
      entity_id: entityId,
      operation: options.operation ?? "UPDATE",
      data,
      version: options.version ?? 1,
      timestamp: options.timestamp ?? new Date().toISOString(),
      ...(options.requiresLock !== undefined ? { requires_lock: options.requiresLock } : {}),
      ...(options.priority !== undefined ? { priority: options.priority } : {}),
      ...(this.userId !== null ? { user_id: this.userId } : {}),
      ...options.fields,
    };
    const message: Message = { type: "data_sync", operation };
    checkEncodable(message, this.encoding); // a value the wire cannot carry fails here
    const stored: StoredOperation = { id, order: this.nextOrder++, message };
    this.reserved += 1;
    try {
      await this.storage.putOperation(stored);
    } finally {
      this.reserved -= 1;
    }
    let settle!: (result: Answer | Error) => void;
    const answer = new Promise<Answer>((resolve, reject) => {
      settle = (result) => (result instanceof Error ? reject(result) : resolve(result));
    });
    answer.catch(() => undefined); // an application that only listens to "answer" gets no warning
    if (this.stopped) {
      settle(this.stopped);
      return { id, answer };
    }
    this.outbox.set(id, { stored, settle, sentAt: null, retryAt: null, sends: 0 });
    this.toSend.add(id);
    this.flush();
    return { id, answer };
  }

  /** The store's operations (and snapshots) in seq order, each once, until the client stops.
   * Use it or the "op"/"snapshot" listeners, not both. */
  async *events(): AsyncGenerator<StoreEvent> {
    while (true) {
      const event = this.take();
      if (event) {
        yield event;
        continue;
      }
      if (this.stopped) return;
      await new Promise<void>((resolve) => this.waiters.add(resolve));
    }
  }

  /** Asks for the store's whole state (also done by itself on resync_required). */
  requestSnapshot(): void {
    this.awaitingSnapshot = true;
    this.control.push({ type: "snapshot_request" });
    this.flush();
  }

  /** Uses `token` from now on: sent on the live connection at once (refresh_token, answered
   * token_refreshed or error 4003 through the "message" listeners) and on every reconnect. */
  refreshToken(token: string): void {
    this.token = token;
    if (this.connected) {
      this.control.push({ type: "refresh_token", token });
      this.flush();
    }
  }

  /** Takes the entity's lock for this connection (locks end with it): lock_acquired, or
   * LockFailedError with the holder. `timeoutMs`: how long the lock lasts. */
  acquireLock(entityType: string, entityId: string, options: { timeoutMs?: number; lockId?: string } = {}): Promise<Message> {
    const lockId = options.lockId ?? `${this.terminalId}-lock-${randomId()}`;
    return this.request("acquireLock", (request) => {
      this.locks.set(lockId, request);
      return { type: "acquire_lock", entity_type: entityType, entity_id: entityId, timeout: options.timeoutMs ?? 30_000, lock_id: lockId };
    });
  }

  /** Releases the entity's lock: lock_released (`released` false when none was held). */
  releaseLock(entityType: string, entityId: string, lockId?: string): Promise<Message> {
    return this.request("releaseLock", (request) => {
      const key = entityKey(entityType, entityId);
      this.releases.set(key, [...(this.releases.get(key) ?? []), request]);
      return { type: "release_lock", entity_type: entityType, entity_id: entityId, ...(lockId ? { lock_id: lockId } : {}) };
    });
  }

  /** Settles a manual conflict (OperationRejectedError.conflictId): the sync_confirmation
   * (`status` resolved), or OperationRejectedError (4010 when there is no such conflict). */
  async resolveConflict(
    conflictId: string,
    resolution: "accept_remote" | "accept_local" | "merge",
    resolvedData?: Record<string, unknown>,
  ): Promise<Answer> {
    const message = await this.request("resolveConflict", (request) => {
      this.resolutions.set(conflictId.replace(/^conflict:/, ""), request);
      this.resolutions.set(conflictId, request);
      return {
        type: "conflict_resolution",
        conflict_id: conflictId,
        resolution,
        ...(resolvedData ? { resolved_data: resolvedData } : {}),
        timestamp: new Date().toISOString(),
      };
    });
    if (message.type !== "sync_confirmation") {
      throw new OperationRejectedError(conflictId, "rejected", message);
    }
    return answerOf(message);
  }

  private request(what: string, register: (request: Request) => Message): Promise<Message> {
    if (this.stopped) return Promise.reject(this.stopped);
    if (!this.connected) return Promise.reject(new NotConnectedError(what));
    if (this.pendingRequests() >= MAX_REQUESTS) {
      return Promise.reject(new Error(`${MAX_REQUESTS} requests are waiting for an answer already`));
    }
    return new Promise<Message>((resolve, reject) => {
      const request = { resolve, reject, deadline: Date.now() + this.answerTimeout * 1000 };
      this.control.push(register(request));
      this.flush();
    });
  }

  private pendingRequests(): number {
    let n = this.locks.size + this.resolutions.size / 2;
    for (const waiting of this.releases.values()) n += waiting.length;
    return n;
  }

  private failRequests(err: Error, onlyExpired = false): void {
    const now = Date.now();
    const failed = (request: Request): boolean => {
      if (onlyExpired && request.deadline > now) return false;
      request.reject(onlyExpired ? new Error("no answer from the server in time") : err);
      return true;
    };
    for (const [key, request] of this.locks) if (failed(request)) this.locks.delete(key);
    for (const [key, request] of this.resolutions) if (onlyExpired ? request.deadline <= now : true) {
      this.resolutions.delete(key);
      request.reject(onlyExpired ? new Error("no answer from the server in time") : err);
    }
    for (const [key, waiting] of this.releases) {
      const left = waiting.filter((request) => !failed(request));
      if (left.length) this.releases.set(key, left);
      else this.releases.delete(key);
    }
  }

  // ---- connecting ------------------------------------------------------------------------

  private url(base: string): string {
    const params = new URLSearchParams({ type: this.terminalType, encoding: this.encoding });
    if (this.storeId !== null) params.set("store_id", this.storeId);
    if (this.userId !== null) params.set("user_id", this.userId);
    if (this.watermark !== null) {
      params.set("since", String(this.watermark));
      if (this.epoch !== null) params.set("epoch", this.epoch);
    }
    return `${base.replace(/\/+$/, "")}/${encodeURIComponent(this.terminalId)}?${params}`;
  }

  private connect(): void {
    this.retryTimer = null;
    if (this.stopped) return;
    const url = this.url(this.urls[this.attempt % this.urls.length]!);
    let ws: SocketLike;
    try {
      ws = this.socketFactory(url, this.token, this.maxMessageSize);
    } catch (err) {
      this.stop(new ClientStoppedError(`cannot open a WebSocket: ${(err as Error).message}`));
      return;
    }
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    this.connectTimer = setTimeout(() => ws.close(), this.connectTimeout * 1000);
    ws.onerror = () => undefined; // a close follows
    ws.onclose = (ev) => this.closed(ws, ev.code, ev.reason);
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      this.lastReceived = Date.now();
      let messages: Message[];
      try {
        messages = decodeFrame(ev.data as string | ArrayBuffer, this.maxMessageSize);
      } catch (err) {
        // The server never sends this. Too big a frame would come again: stop. Anything else
        // means something in between is broken: start over. (A browser closes only with 1000
        // or 3000-4999, so the code says nothing to the server; the reason does.)
        if ((err as FrameError).tooBig) {
          this.stop(new ClientStoppedError(`a frame from the server was refused: ${(err as Error).message}`, 1009));
        } else {
          this.restart(`undecodable frame: ${(err as Error).message}`.slice(0, 120));
        }
        return;
      }
      for (const message of messages) {
        if (!this.connected) {
          if (message.type !== "connection_established") continue;
          this.onEstablished(ws, message);
        } else this.handle(message);
        if (this.ws !== ws) return;
      }
      this.flush();
    };
  }

  private onEstablished(ws: SocketLike, message: Message): void {
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.connectTimer = null;
    this.established = message;
    this.stats.connects += 1;
    this.connected = true;
    this.establishedAt = this.lastReceived = this.lastPing = Date.now();
    const serverEpoch = typeof message["epoch"] === "string" ? message["epoch"] : null;
    if (this.watermark === null) {
      this.watermark = Number(message["last_seq"]);
      this.epoch = serverEpoch;
      if (this.delivered === null) {
        this.delivered = this.watermark;
        this.deliveredEpoch = serverEpoch;
        this.positionDirty = true;
      }
    } else if (this.epoch === null) {
      this.epoch = serverEpoch; // resumed by seqs alone: the stream is this one from now
      if (this.deliveredEpoch === null) this.deliveredEpoch = serverEpoch;
    }
    // The stream restarts after the watermark; what is held ahead may come again.
    this.stalledSince = this.ahead.size ? Date.now() : null;
    this.awaitingSnapshot = false;
    this.snapshotEntities = [];
    // Every unanswered operation goes again, in its original order, with its original id.
    this.toSend = new Set(this.outbox.keys());
    for (const outgoing of this.outbox.values()) outgoing.sentAt = outgoing.retryAt = null;
    this.control = [];
    if (serverEpoch !== null && this.epoch !== serverEpoch) {
      // Another stream (the store was restored): nothing of it is taken before a snapshot.
      this.stats.resyncs += 1;
      this.requestSnapshot();
    }
    this.ticker = setInterval(() => this.tick(ws), TICK_MS);
    for (const listener of this.listeners.connected) listener(message);
    this.wake();
  }

  private closed(ws: SocketLike, code: number, reason: string): void {
    if (ws !== this.ws) return;
    const wasConnected = this.connected;
    this.dropSocket(ws);
    this.stats.closes[code] = (this.stats.closes[code] ?? 0) + 1;
    if (wasConnected) for (const listener of this.listeners.disconnected) listener({ code, reason });
    if (this.stopped) return;
    if (FATAL_CLOSES.has(code)) {
      this.stop(new ClientStoppedError(`closed with ${code}${reason ? `: ${reason}` : ""}`, code));
      return;
    }
    const now = Date.now();
    if (wasConnected) {
      this.downSince = now;
      if (now - this.establishedAt >= this.backoff.stableAfter * 1000) this.attempt = -1;
    }
    this.attempt += 1;
    if (this.backoff.maxAttempts !== null && this.attempt >= this.backoff.maxAttempts) {
      this.stop(new ClientStoppedError(`gave up after ${this.attempt} failed attempts`, code));
      return;
    }
    if (this.backoff.maxElapsed !== null && now - this.downSince > this.backoff.maxElapsed * 1000) {
      this.stop(new ClientStoppedError(`no connection for ${Math.round((now - this.downSince) / 1000)}s`, code));
      return;
    }
    const delay = backoffDelay(this.backoff, this.attempt, this.rand);
    this.retryTimer = setTimeout(() => this.connect(), delay * 1000);
  }

  private dropSocket(ws: SocketLike): void {
    ws.onmessage = ws.onclose = null;
    if (this.ws === ws) this.ws = null;
    this.connected = false;
    if (this.ticker) clearInterval(this.ticker);
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.ticker = this.connectTimer = null;
    this.failRequests(new NotConnectedError("the request (the connection closed before its answer)"));
  }

  private clearTimers(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  /** Starts the connection over (it resumes from the watermark). `deliberate`: not a fault,
   * so the backoff does not grow (the first delay). */
  private restart(reason: string, deliberate = false): void {
    const ws = this.ws;
    if (!ws) return;
    if (deliberate) this.establishedAt = -Infinity; // counts as a stable connection
    ws.close(1000, reason);
    this.closed(ws, 1000, reason); // at once: a close handshake may take seconds
  }

  // ---- sending ---------------------------------------------------------------------------

  private flush(): void {
    const ws = this.ws;
    if (!ws || !this.connected) return;
    while ((this.control.length || this.toSend.size) && ws.bufferedAmount < MAX_BUFFERED) {
      const messages = this.control.splice(0);
      const now = Date.now();
      for (const id of this.toSend) {
        if (messages.length >= SEND_BATCH) break;
        this.toSend.delete(id);
        const outgoing = this.outbox.get(id);
        if (!outgoing) continue; // answered meanwhile
        if (outgoing.sends) this.stats.resent += 1;
        else this.stats.sent += 1;
        outgoing.sends += 1;
        outgoing.sentAt = now;
        outgoing.retryAt = null;
        messages.push(outgoing.stored.message);
      }
      if (!messages.length) break;
      for (const frame of encodeFrames(messages, this.encoding)) ws.send(frame);
    }
  }

  private tick(ws: SocketLike): void {
    if (ws !== this.ws) return;
    const now = Date.now();
    for (const [id, outgoing] of this.outbox) {
      let due = outgoing.retryAt;
      if (due === null && outgoing.sentAt !== null) due = outgoing.sentAt + this.answerTimeout * 1000;
      if (due !== null && due <= now && !this.toSend.has(id)) {
        outgoing.sentAt = outgoing.retryAt = now; // not due again until sent
        this.toSend.add(id);
      }
    }
    this.failRequests(new Error("no answer"), true);
    this.flushPosition();
    if (now - this.lastReceived > 2 * this.keepalive * 1000) {
      this.restart("the server went silent");
      return;
    }
    if (now - this.lastPing > this.keepalive * 1000) {
      this.lastPing = now;
      this.control.push({ type: "ping", timestamp: now });
    }
    if (this.stalledSince !== null && now - this.stalledSince > this.gapTimeout * 1000) {
      this.restart("resuming after a gap");
      return;
    }
    if (this.paused && this.queue.length - this.queueHead <= this.eventsSize / 2) {
      this.paused = false;
      this.restart("resuming after the application caught up", true);
      return;
    }
    this.flush();
  }

  // ---- receiving -------------------------------------------------------------------------

  private handle(message: Message): void {
    switch (message.type) {
      case "data_sync": {
        const operation = (message["operation"] ?? {}) as Record<string, unknown>;
        const seq = operation["seq"];
        if (typeof seq === "number") {
          const own = operation["terminal_id"] === this.terminalId;
          this.arrive(seq, { kind: "op", seq, operation, own });
        }
        break;
      }
      case "sync_confirmation":
        this.confirmed(message);
        break;
      case "sync_error":
      case "sync_conflict":
        this.refused(message);
        break;
      case "resync_required":
        if (!this.awaitingSnapshot) {
          this.stats.resyncs += 1;
          this.requestSnapshot();
        }
        break;
      case "snapshot":
        this.snapshot(message);
        break;
      case "lock_acquired":
      case "lock_failed": {
        const id = message["lock_id"];
        const request = typeof id === "string" ? this.locks.get(id) : undefined;
        if (request) {
          this.locks.delete(id as string);
          if (message.type === "lock_acquired") request.resolve(message);
          else request.reject(new LockFailedError(message));
        }
        break;
      }
      case "lock_released": {
        const key = entityKey(String(message["entity_type"]), String(message["entity_id"]));
        const waiting = this.releases.get(key);
        const request = waiting?.shift();
        if (waiting && !waiting.length) this.releases.delete(key);
        request?.resolve(message);
        break;
      }
      case "error":
        if (this.awaitingSnapshot && RETRY_CODES.has(Number(message["code"]))) {
          // The snapshot was refused (storage down): reconnecting asks again, after a backoff.
          this.restart("snapshot refused; retrying");
          return;
        }
        for (const listener of this.listeners.message) listener(message);
        break;
      default:
        for (const listener of this.listeners.message) listener(message);
    }
  }

  private confirmed(message: Message): void {
    const id = message["operation_id"];
    if (typeof id !== "string") return;
    const resolution = this.resolutions.get(id);
    if (resolution && !this.outbox.has(id)) {
      this.settleResolution(id, message);
      return;
    }
    const outgoing = this.outbox.get(id);
    if (!outgoing) return; // the answer to a repeat of an operation already answered
    this.outbox.delete(id);
    this.forgetOperation(id);
    this.stats.confirmed += 1;
    if (message["status"] === "duplicate") this.stats.duplicates += 1;
    const answer = answerOf(message);
    if (answer.seq !== null) {
      const operation = {
        ...(outgoing.stored.message["operation"] as Record<string, unknown>),
        seq: answer.seq,
        version: answer.version,
        status: answer.status,
        terminal_id: this.terminalId,
      };
      this.arrive(answer.seq, { kind: "op", seq: answer.seq, operation, own: true });
    }
    outgoing.settle?.(answer);
    for (const listener of this.listeners.answer) listener({ operationId: id, answer });
  }

  private settleResolution(id: string, message: Message): void {
    const request = this.resolutions.get(id)!;
    for (const [key, other] of this.resolutions) if (other === request) this.resolutions.delete(key);
    request.resolve(message);
    const seq = message["seq"];
    if (message.type === "sync_confirmation" && typeof seq === "number" && this.watermark !== null && seq > this.watermark) {
      // The confirmation does not carry the entity's state: the stream brings that record again.
      this.restart("reading a resolved conflict's record", true);
    }
  }

  private refused(message: Message): void {
    const id = message["operation_id"];
    if (typeof id !== "string") return;
    if (this.resolutions.has(id) && !this.outbox.has(id)) {
      this.settleResolution(id, message);
      return;
    }
    const outgoing = this.outbox.get(id);
    if (!outgoing) return;
    if (message.type === "sync_error" && RETRY_CODES.has(Number(message["code"]))) {
      this.stats.retries += 1;
      outgoing.retryAt = Date.now() + this.retryAfter * 1000 * (0.5 + this.rand());
      return;
    }
    this.outbox.delete(id);
    this.forgetOperation(id);
    this.stats.rejected += 1;
    const error = new OperationRejectedError(id, message.type === "sync_conflict" ? "conflict" : "rejected", message);
    outgoing.settle?.(error);
    for (const listener of this.listeners.answer) listener({ operationId: id, error });
  }

  private snapshot(message: Message): void {
    if ((message["page"] ?? 0) === 0) this.snapshotEntities = [];
    const entities = message["entities"];
    if (Array.isArray(entities)) this.snapshotEntities.push(...(entities as Record<string, unknown>[]));
    if (message["complete"] === false) return;
    const all = this.snapshotEntities;
    this.snapshotEntities = [];
    const seq = Number(message["seq"]);
    this.awaitingSnapshot = false;
    this.watermark = seq;
    this.epoch = typeof message["epoch"] === "string" ? message["epoch"] : this.epoch;
    for (const held of [...this.ahead.keys()]) if (held <= seq) this.ahead.delete(held);
    this.emit({ kind: "snapshot", seq, epoch: this.epoch, entities: all });
    this.advance();
  }

  private arrive(seq: number, event: StoreEvent): void {
    if (this.watermark === null || seq <= this.watermark || this.ahead.has(seq)) return;
    if (this.paused) return; // the resume after the application caught up sends it again
    // Held ahead of a gap, at most eventsSize; the seq that fills the gap is always taken (it
    // moves the stream on), a further one comes again with the gap-timeout resume.
    if (seq !== this.watermark + 1 && this.ahead.size >= this.eventsSize) return;
    this.ahead.set(seq, event);
    if (!this.awaitingSnapshot) this.advance(); // else held: the snapshot says where it is
  }

  private advance(): void {
    let advanced = false;
    let event: StoreEvent | undefined;
    while (this.watermark !== null && (event = this.ahead.get(this.watermark + 1)) !== undefined) {
      if (this.queue.length - this.queueHead >= this.eventsSize) {
        // The application is behind: hold the stream here and resume from the watermark once
        // it caught up (what is held ahead comes again then).
        this.paused = true;
        this.ahead.clear();
        break;
      }
      this.ahead.delete(this.watermark + 1);
      this.watermark += 1;
      advanced = true;
      this.emit(event);
    }
    // A gap times out only when the stream stands still.
    if (!this.ahead.size) this.stalledSince = null;
    else if (advanced || this.stalledSince === null) this.stalledSince = Date.now();
  }

  private emit(event: StoreEvent): void {
    this.queue.push(event);
    this.drain();
    this.wake();
  }

  /** Hands queued events to the listeners, if there are any. */
  private drain(): void {
    if (!this.listeners.op.size && !this.listeners.snapshot.size) return;
    let event: StoreEvent | undefined;
    while ((event = this.take()) !== undefined) {
      if (event.kind === "op") for (const listener of this.listeners.op) listener(event);
      else for (const listener of this.listeners.snapshot) listener(event);
    }
  }

  private take(): StoreEvent | undefined {
    if (this.queueHead >= this.queue.length) return undefined;
    const event = this.queue[this.queueHead++]!;
    if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
      this.queue.splice(0, this.queueHead);
      this.queueHead = 0;
    }
    // The position kept is that of what the application took (a reload resumes after it).
    this.delivered = event.seq;
    if (event.kind === "snapshot") this.deliveredEpoch = event.epoch;
    this.positionDirty = true;
    this.persist();
    return event;
  }

  // ---- the storage -----------------------------------------------------------------------

  private forgetOperation(id: string): void {
    this.forget.push(id);
    this.persist();
  }

  private flushPosition(): void {
    if (this.positionDirty) this.persist();
  }

  /** One write at a time; what changes meanwhile goes in the next one. */
  private persist(): void {
    if (this.writing) return;
    this.writing = (async () => {
      try {
        while (this.forget.length || this.positionDirty) {
          const ids = this.forget.splice(0);
          if (ids.length) await this.storage.deleteOperations(ids);
          if (this.positionDirty) {
            this.positionDirty = false;
            await this.storage.setPosition({ watermark: this.delivered, epoch: this.deliveredEpoch });
          }
        }
      } catch (err) {
        for (const listener of this.listeners.message) listener({ type: "storage_error", error: String(err) });
      } finally {
        this.writing = null;
      }
    })();
  }

  // ---- waiting ---------------------------------------------------------------------------

  private wake(): void {
    const waiters = [...this.waiters];
    this.waiters.clear();
    for (const wake of waiters) wake();
  }

  private async waitFor(done: () => boolean, timeoutMs: number, what: string, failOnStop = true): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!done()) {
      if (failOnStop && this.stopped) throw this.stopped;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${what}`);
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve) => {
        this.waiters.add(resolve);
        timer = setTimeout(resolve, Math.min(left, 1000));
      });
      clearTimeout(timer);
    }
  }
}

function answerOf(message: Message): Answer {
  return {
    operationId: String(message["operation_id"]),
    status: String(message["status"]),
    seq: typeof message["seq"] === "number" ? message["seq"] : null,
    version: typeof message["version"] === "number" ? message["version"] : null,
    message,
  };
}

function entityKey(entityType: string, entityId: string): string {
  return `${entityType}\u0000${entityId}`;
}

function positive(name: string, value: number): number {
  if (!(typeof value === "number" && value > 0 && Number.isFinite(value))) {
    throw new TypeError(`${name} must be a positive number, not ${String(value)}`);
  }
  return value;
}

function randomId(): string {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
