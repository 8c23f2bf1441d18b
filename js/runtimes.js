// The onnxruntime packages the Node tests and the benchmark run textgen.js on, by name: each
// loads its module (onnxruntime-web's wasm backend with one thread, as in a page without COOP/COEP).
export const RUNTIMES = {
  'onnxruntime-node': async () => import('onnxruntime-node'),
  'onnxruntime-web-wasm': async () => {
    const ort = await import('onnxruntime-web');
    ort.env.wasm.numThreads = 1;
    return ort;
  },
};
