// Starts the project's real server (`python -m chefia_rt serve`, the embedded SQLite default)
// on a free port in a temp dir, and kills or restarts it. CHEFIA_PYTHON names the interpreter
// (default: the repository's .venv).
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const PYTHON = process.env.CHEFIA_PYTHON ?? join(REPO, ".venv/bin/python");
export const BOUND = 20_000; // ms: the liveness bound for anything to arrive

export function freePort() {
  return new Promise((done, fail) => {
    const probe = createServer();
    probe.on("error", fail);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => done(port));
    });
  });
}

export class Server {
  constructor(dir, port, env = {}) {
    this.dir = dir;
    this.port = port;
    this.env = env;
    this.url = `ws://127.0.0.1:${port}/ws`;
    this.process = null;
    this.output = "";
  }

  static async start(env = {}) {
    const server = new Server(mkdtempSync(join(tmpdir(), "chefia-js-")), await freePort(), env);
    await server.run();
    return server;
  }

  /** Starts the process and waits until /health answers. */
  async run() {
    this.process = spawn(PYTHON, ["-m", "chefia_rt", "serve"], {
      cwd: this.dir,
      detached: true, // its own process group: a kill takes its workers too
      stdio: ["ignore", "pipe", "pipe"],
      env: {
        ...process.env,
        PYTHONPATH: REPO,
        WS_HOST: "127.0.0.1",
        WS_PORT: String(this.port),
        WS_WORKERS: "1",
        DATABASE_URL: `sqlite:///${join(this.dir, "chefia.db")}`,
        ...this.env,
      },
    });
    // The server is in its own process group: take it down with this process, however it ends.
    const pid = this.process.pid;
    const reap = () => {
      try {
        process.kill(-pid, "SIGKILL");
      } catch {
        // gone already
      }
    };
    const interrupted = (signal) => {
      reap();
      process.exit(signal === "SIGINT" ? 130 : 143);
    };
    process.once("exit", reap);
    process.once("SIGINT", interrupted);
    process.once("SIGTERM", interrupted);
    this.process.once("exit", () => {
      process.off("exit", reap);
      process.off("SIGINT", interrupted);
      process.off("SIGTERM", interrupted);
    });
    const keep = (chunk) => (this.output = (this.output + chunk).slice(-20_000));
    this.process.stdout.on("data", keep);
    this.process.stderr.on("data", keep);
    const exited = new Promise((done) => this.process.once("exit", done));
    const deadline = Date.now() + BOUND;
    while (Date.now() < deadline) {
      const early = await Promise.race([exited.then(() => true), sleep(100).then(() => false)]);
      if (early) throw new Error(`the server exited at start:\n${this.output}`);
      try {
        const answer = await fetch(`http://127.0.0.1:${this.port}/health`);
        if (answer.ok) return;
      } catch {
        // not listening yet
      }
    }
    throw new Error(`the server did not answer /health within ${BOUND} ms:\n${this.output}`);
  }

  /** SIGKILL: no drain, no goodbye. */
  async kill() {
    const child = this.process;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((done) => child.once("exit", done));
    process.kill(-child.pid, "SIGKILL");
    await exited;
  }

  async stop() {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export function sleep(ms) {
  return new Promise((done) => setTimeout(done, ms));
}

/** Resolves once `check()` holds (polled; the test's liveness bound applies). */
export async function until(check, what, bound = BOUND) {
  const deadline = Date.now() + bound;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}
