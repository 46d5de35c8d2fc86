/**
 * The package under Node: everything of the browser entry, FileStorage, and a Client whose
 * WebSocket is Node's own (22 and later) or `ws` (Node 20 has none). Under `ws` the token
 * travels in the Authorization header rather than the URL.
 */
import WebSocket from "ws";
import { Client as BaseClient, type ClientOptions, type SocketFactory, type SocketLike } from "./client.js";

export * from "./index.js";
export { FileStorage } from "./file-storage.js";

/** `ws`, with the token as a bearer header and frames bounded by `maxMessageSize`. */
export const nodeSocket: SocketFactory = (url, token, maxMessageSize) =>
  new WebSocket(url, {
    headers: token ? { Authorization: `Bearer ${token}` } : {},
    maxPayload: maxMessageSize,
    perMessageDeflate: false,
  }) as unknown as SocketLike;

export class Client extends BaseClient {
  constructor(options: ClientOptions) {
    super({ socket: nodeSocket, ...options });
  }
}
