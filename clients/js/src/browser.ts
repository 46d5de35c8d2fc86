// The browser bundle's entry: everything of the package but the Node parts.
export * from "./index.js";
