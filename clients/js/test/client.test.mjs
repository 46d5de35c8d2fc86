// The Node client against the real server (see server.mjs): confirmation, pushes, resume after
// the server is killed and restarted, a file outbox resent by a new client after the first was
// killed mid-send, takeover, a 1009 close; and the file storage on its own.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, readFileSync, appendFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import {
  Client,
  ClientStoppedError,
  FileStorage,
  LockFailedError,
  MemoryStorage,
  OperationRejectedError,
  OutboxFullError,
} from "../dist/node.js";
import { BOUND, Server, freePort, until } from "./server.mjs";

let server;
before(async () => {
  server = await Server.start();
});
after(async () => {
  await server?.stop();
});

const clients = [];
function client(terminalId, storeId, options = {}) {
  const c = new Client({
    urls: server.url,
    terminalId,
    storeId,
    storage: options.storage ?? new MemoryStorage(),
    backoff: { initial: 0.05, maximum: 0.5 },
    ...options,
  });
  clients.push(c);
  return c;
}
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
});

/** Every event a client hands over, in order. */
function collect(c) {
  const seen = [];
  c.on("op", (event) => seen.push(event));
  c.on("snapshot", (event) => seen.push(event));
  return seen;
}

test("an operation is confirmed and pushed to the other terminal, in both encodings", async () => {
  const a = client("pos-a", "confirm", { encoding: "msgpack" });
  const b = client("kds-b", "confirm", { encoding: "json", terminalType: "kds" });
  const c = client("pos-c", "confirm", { encoding: "msgpack" });
  const seenB = collect(b);
  const seenC = collect(c);
  await Promise.all([a.start(), b.start(), c.start()]);
  await Promise.all([a.waitConnected(BOUND), b.waitConnected(BOUND), c.waitConnected(BOUND)]);
  const answer = await a.send("tables", "table-7", { status: "occupied", guests: 4 });
  assert.equal(answer.status, "applied");
  assert.equal(answer.seq, 1);
  // A big one (pushed lz4-compressed to msgpack terminals) and a burst (pushed as batches).
  const big = { note: "x".repeat(4000), n: 0 };
  const answers = await Promise.all([
    a.send("tables", "table-big", big),
    ...Array.from({ length: 30 }, (_, i) => a.send("tables", `t${i}`, { n: i })),
  ]);
  assert.deepEqual(answers.map((x) => x.status), Array(31).fill("applied"));
  await until(() => seenB.length === 32 && seenC.length === 32, "the pushes");
  for (const seen of [seenB, seenC]) {
    assert.deepEqual(seen.map((e) => e.seq), Array.from({ length: 32 }, (_, i) => i + 1));
    assert.ok(seen.every((e) => e.kind === "op" && !e.own && e.operation.terminal_id === "pos-a"));
    assert.deepEqual(seen[0].operation.data, { status: "occupied", guests: 4 });
    assert.equal(seen[1].operation.data.note.length, 4000);
  }
  assert.equal(a.watermark, 32);
  assert.equal(a.unanswered().length, 0);
  // A refusal is a rejected promise with its code: a kitchen display may not create orders.
  await assert.rejects(b.send("orders", "o1", { items: [] }, { operation: "CREATE" }), (err) => {
    assert.ok(err instanceof OperationRejectedError);
    assert.equal(err.kind, "rejected");
    assert.equal(err.code, 4008);
    return true;
  });
});

test("after the server is killed and restarted, what was sent meanwhile arrives once, in order", async () => {
  const a = client("pos-a", "restart");
  const b = client("pos-b", "restart", { encoding: "json" });
  const seenB = collect(b);
  await Promise.all([a.start(), b.start()]);
  await Promise.all([a.waitConnected(BOUND), b.waitConnected(BOUND)]);
  await a.send("tables", "t0", { n: 0 });
  await until(() => seenB.length === 1, "the first push");
  await server.kill();
  await until(() => !a.isConnected && !b.isConnected, "both to notice");
  const pending = [];
  for (let i = 1; i <= 5; i++) pending.push(a.send("tables", `t${i}`, { n: i }));
  pending.push(b.send("tables", "tb", { n: 99 }));
  await server.run();
  const answers = await Promise.all(pending);
  assert.deepEqual(answers.map((x) => x.status), Array(6).fill("applied"));
  await until(() => seenB.length === 7 && a.watermark === 7, "the stream after the restart");
  assert.deepEqual(seenB.map((e) => e.seq), [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(seenB.filter((e) => e.own).map((e) => e.operation.entity_id), ["tb"]);
  assert.ok(a.stats.connects >= 2 && b.stats.connects >= 2);
});

test("a file outbox survives a client killed mid-send; a new one resends it once", async () => {
  const dir = mkdtempSync(join(tmpdir(), "chefia-outbox-"));
  const file = join(dir, "outbox.jsonl");
  const child = spawn(process.execPath, ["test/fixtures/sender.mjs", server.url, "dropped", "pos-a", file, "400"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const kept = new Set();
  let answered = 0;
  let buffer = "";
  const exited = new Promise((done) => child.once("exit", done));
  child.stdout.on("data", (chunk) => {
    buffer += chunk;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (line.startsWith("kept ")) kept.add(line.slice(5));
      if (line.startsWith("answered ")) answered += 1;
    }
    if (answered >= 20 && child.exitCode === null) child.kill("SIGKILL"); // mid-send
  });
  await exited;
  assert.ok(answered >= 20, "the sender was answered before it was killed");
  assert.ok(kept.size < 400, "the sender was killed before it kept everything");

  const stored = await new FileStorage(file).load();
  const left = stored.outbox.map((op) => op.id);
  assert.ok(left.length > 0, "unanswered operations were left in the file");
  const b = client("pos-a", "dropped", { storage: new FileStorage(file) });
  const answers = [];
  b.on("answer", (a) => answers.push(a));
  await b.start();
  await until(() => answers.length === left.length, "the resent operations' answers");
  assert.deepEqual(answers.map((a) => a.operationId).sort(), [...left].sort());
  assert.ok(answers.every((a) => a.answer && ["applied", "duplicate"].includes(a.answer.status)));
  assert.equal(b.unanswered().length, 0);
  await until(() => readFileSync(file, "utf8").length > 0 && b.watermark !== null, "the position");

  // The store's log holds every kept operation, each once, and nothing that was not sent.
  const reader = client("kds-r", "dropped", { terminalType: "kds" });
  const seen = collect(reader);
  const readerStorage = new MemoryStorage();
  await readerStorage.setPosition({ watermark: 0, epoch: null });
  const r = client("kds-r2", "dropped", { terminalType: "kds", storage: readerStorage });
  const all = collect(r);
  await r.start();
  await r.waitConnected(BOUND);
  const last = r.established.last_seq;
  await until(() => all.length === last, "the whole log");
  const ids = all.map((e) => e.operation.id);
  assert.equal(new Set(ids).size, ids.length, "no operation applied twice");
  for (const id of kept) assert.ok(ids.includes(id), `${id} was kept and must be in the log`);
  assert.ok(ids.every((id) => /^op-\d+$/.test(id) && Number(id.slice(3)) < 400));
  assert.equal(seen.length, 0);
  // What the file holds now: nothing unanswered.
  assert.equal((await new FileStorage(file).load()).outbox.length, 0);
});

test("a takeover stops the old client without a fight", async () => {
  const a = client("pos-a", "takeover");
  await a.start();
  await a.waitConnected(BOUND);
  const b = client("pos-a", "takeover");
  await b.start();
  await b.waitConnected(BOUND);
  const stopped = await a.waitStopped(BOUND);
  assert.equal(stopped.code, 4004);
  assert.equal(a.stats.connects, 1);
  await assert.rejects(a.send("tables", "t1", {}), ClientStoppedError);
  assert.equal((await b.send("tables", "t1", { n: 1 })).status, "applied");
  assert.equal(b.stopped, null);
});

test("a frame beyond the server's limit is closed 1009 and stops the client", async () => {
  const a = client("pos-a", "toobig", { encoding: "json" });
  await a.start();
  await a.waitConnected(BOUND);
  const huge = a.send("tables", "t1", { blob: "x".repeat(1_100_000) });
  await assert.rejects(huge, (err) => err instanceof ClientStoppedError && err.code === 1009);
  assert.equal(a.stopped.code, 1009);
  assert.equal(a.unanswered().length, 1); // still kept, for the application to decide
});

test("the file storage keeps operations and the position, and ignores a torn last line", async () => {
  const file = join(mkdtempSync(join(tmpdir(), "chefia-file-")), "state.jsonl");
  const storage = new FileStorage(file);
  assert.deepEqual(await storage.load(), { outbox: [], watermark: null, epoch: null });
  const message = (id) => ({ type: "data_sync", operation: { id } });
  await storage.putOperation({ id: "b", order: 2, message: message("b") });
  await storage.putOperation({ id: "a", order: 1, message: message("a") });
  await storage.putOperation({ id: "c", order: 3, message: message("c") });
  await storage.deleteOperations(["c"]);
  await storage.setPosition({ watermark: 41, epoch: "e1" });
  await storage.close();
  appendFileSync(file, '{"put":{"id":"torn","ord');
  const again = await new FileStorage(file).load();
  assert.deepEqual(again.outbox.map((op) => op.id), ["a", "b"]);
  assert.equal(again.watermark, 41);
  assert.equal(again.epoch, "e1");
  assert.throws(() => new Client({ urls: [], terminalId: "x", storage }), /at least one URL/);
  assert.throws(() => new Client({ urls: "ws://h/ws", terminalId: "bad id", storage }), /invalid terminal id/);
});

test("locks are taken, refused to another terminal, released; a manual conflict is resolved", async () => {
  const a = client("pos-a", "locks");
  const b = client("pos-b", "locks", { encoding: "json" });
  const seenA = collect(a);
  const seenB = collect(b);
  await Promise.all([a.start(), b.start()]);
  await Promise.all([a.waitConnected(BOUND), b.waitConnected(BOUND)]);
  const lock = await a.acquireLock("orders", "o1", { timeoutMs: 10_000 });
  assert.equal(lock.type, "lock_acquired");
  await assert.rejects(b.acquireLock("orders", "o1"), (err) => err instanceof LockFailedError && err.response.locked_by === "pos-a");
  assert.equal((await a.releaseLock("orders", "o1", lock.lock_id)).released, true);
  assert.equal((await b.acquireLock("orders", "o1")).type, "lock_acquired");

  // cashier_operations need a person: a stale version is a sync_conflict, resolved in band.
  await a.send("cashier_operations", "c1", { amount: 10 }, { operation: "CREATE" });
  await a.acquireLock("cashier_operations", "c1");
  const stale = a.send("cashier_operations", "c1", { amount: 20 }, { version: 1 });
  const conflict = await stale.then(
    () => assert.fail("a stale version must conflict"),
    (err) => err,
  );
  assert.ok(conflict instanceof OperationRejectedError && conflict.kind === "conflict", String(conflict));
  const resolved = await a.resolveConflict(conflict.conflictId, "accept_local");
  assert.equal(resolved.status, "resolved");
  // The resolved record comes through the stream, to both terminals, in order.
  await until(() => seenA.some((e) => e.seq === resolved.seq) && seenB.some((e) => e.seq === resolved.seq), "the resolved record");
  for (const seen of [seenA, seenB]) {
    assert.deepEqual(seen.map((e) => e.seq), Array.from({ length: resolved.seq }, (_, i) => i + 1));
    assert.equal(seen.at(-1).operation.data.amount, 20);
  }
  await assert.rejects(a.resolveConflict(conflict.conflictId, "accept_local"), (err) => err.code === 4010);
});

test("events not taken are bounded: the stream pauses and resumes from the watermark", async () => {
  const writer = client("pos-w", "bounded");
  const reader = client("kds-r", "bounded", { terminalType: "kds", eventsSize: 5 });
  await Promise.all([writer.start(), reader.start()]);
  await Promise.all([writer.waitConnected(BOUND), reader.waitConnected(BOUND)]);
  await Promise.all(Array.from({ length: 40 }, (_, i) => writer.send("tables", `t${i}`, { n: i })));
  const seqs = [];
  for await (const event of reader.events()) {
    seqs.push(event.seq);
    if (seqs.length === 40) break;
  }
  assert.deepEqual(seqs, Array.from({ length: 40 }, (_, i) => i + 1));
  assert.ok(reader.stats.connects >= 2, "the reader resumed after pausing");
});

function jwt(secret, claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

test("a token opens the connection and is renewed in band; a bad one stops the client", async () => {
  const secret = "chefia-js-test-key-0123456789abcdef-0123456789";
  const secured = await Server.start({ JWT_SECRET_KEY: secret });
  const now = Math.floor(Date.now() / 1000);
  const token = (exp) => jwt(secret, { sub: "pos-t", store_id: "tokens", terminal_type: "pos", iat: now, exp });
  const open = (options) =>
    new Client({ urls: secured.url, terminalId: "pos-t", storage: new MemoryStorage(), backoff: { initial: 0.05 }, ...options });
  const a = open({ token: token(now + 60) });
  const b = open({ token: jwt("another key, not the server's one......", { sub: "pos-t", store_id: "tokens", terminal_type: "pos", iat: now, exp: now + 60 }) });
  try {
    const messages = [];
    a.on("message", (m) => messages.push(m));
    await a.start();
    await a.waitConnected(BOUND);
    assert.equal(a.established.store_id, "tokens"); // the token's store
    assert.equal((await a.send("tables", "t1", { n: 1 })).status, "applied");
    a.refreshToken(token(now + 3600));
    await until(() => messages.some((m) => m.type === "token_refreshed"), "token_refreshed");
    assert.ok(messages.find((m) => m.type === "token_refreshed").expires_at.startsWith(new Date((now + 3600) * 1000).toISOString().slice(0, 16)));
    await b.start();
    const stopped = await b.waitStopped(BOUND);
    assert.equal(stopped.code, 4003);
  } finally {
    await a.close();
    await b.close();
    await secured.stop();
  }
});

test("a position the log no longer reaches, or another epoch, is answered with a snapshot", async () => {
  const writer = client("pos-w", "resync");
  await writer.start();
  await writer.waitConnected(BOUND);
  for (let i = 0; i < 3; i++) await writer.send("tables", `t${i}`, { n: i });
  for (const position of [{ watermark: 500, epoch: null }, { watermark: 1, epoch: "another-epoch" }]) {
    const head = writer.watermark;
    const storage = new MemoryStorage();
    await storage.setPosition(position);
    const reader = client(`kds-${position.watermark}`, "resync", { terminalType: "kds", storage });
    const seen = collect(reader);
    await reader.start();
    await until(() => seen.length === 1, "the snapshot");
    assert.equal(seen[0].kind, "snapshot");
    assert.equal(seen[0].seq, head);
    const ids = seen[0].entities.map((e) => e.entity_id);
    assert.ok(["t0", "t1", "t2"].every((id) => ids.includes(id)), ids.join());
    assert.equal(reader.epoch, writer.epoch);
    await writer.send("tables", "t9", { n: 9 });
    await until(() => seen.length === 2, "the stream after the snapshot");
    assert.equal(seen[1].seq, seen[0].seq + 1);
    assert.equal(reader.stats.resyncs, 1);
    await reader.persisted();
    assert.deepEqual(await storage.load(), { outbox: [], watermark: seen[1].seq, epoch: writer.epoch });
  }
});

test("a dead URL is skipped for the next; the outbox is bounded; the backoff gives up", async () => {
  const dead = `ws://127.0.0.1:${await freePort()}/ws`; // nothing listens there
  const both = client("pos-u", "urls", { urls: [dead, server.url] });
  await both.start();
  await both.waitConnected(BOUND);
  assert.equal((await both.send("tables", "t1", { n: 1 })).status, "applied");

  const storage = new MemoryStorage();
  const alone = client("pos-d", "urls", { urls: dead, storage, outboxSize: 2, backoff: { initial: 0.01, maximum: 0.05, maxAttempts: 3 } });
  await alone.start();
  const first = alone.send("tables", "t1", { n: 1 });
  await alone.enqueue("tables", "t2", { n: 2 });
  await assert.rejects(alone.enqueue("tables", "t3", { n: 3 }), OutboxFullError);
  await assert.rejects(first, (err) => err instanceof ClientStoppedError && /gave up after 3 failed attempts/.test(err.message));
  // Still kept, in order, for the next client on this storage.
  assert.deepEqual((await storage.load()).outbox.map((op) => op.message.operation.entity_id), ["t1", "t2"]);
  await assert.rejects(alone.send("tables", "t4", {}), ClientStoppedError);
});
