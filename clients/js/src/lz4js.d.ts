// The part of lz4js (which ships no types) this package uses.
declare module "lz4js" {
  /** Decompresses one LZ4 frame from `src` into `dst`; returns the bytes it produced (which
   * may exceed `dst.length`: bytes beyond it are dropped, not written). */
  export function decompressFrame(src: Uint8Array, dst: Uint8Array): number;
  export function compress(src: Uint8Array, maxSize?: number): Uint8Array;
}
