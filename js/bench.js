// Single-stream speed of the JS generator: node bench.js MODEL [CHARS] [REPEATS] -> one JSON line per
// runtime (onnxruntime-node; onnxruntime-web's wasm under Node), best and median chars/s.
import { readFileSync } from 'node:fs';

import { RUNTIMES } from './runtimes.js';
import { Generator } from './textgen.js';

const [model, chars = '20000', repeats = '3'] = process.argv.slice(2);
for (const [name, load] of Object.entries(RUNTIMES)) {
  const gen = await Generator.load(await load(), new Uint8Array(readFileSync(model)));
  await gen.generate('alice ', { maxChars: 500, temperature: 0.8, seed: 1 }); // warm up
  const speeds = [];
  for (let r = 0; r < Number(repeats); r++) {
    const t0 = performance.now();
    const text = await gen.generate('alice ', { maxChars: Number(chars), temperature: 0.8, seed: r + 2 });
    speeds.push(text.length / ((performance.now() - t0) / 1000));
  }
  speeds.sort((a, b) => a - b);
  console.log(JSON.stringify({ bench: 'js_single_stream', runtime: name, chars: Number(chars), temperature: 0.8,
    chars_per_s: speeds[speeds.length - 1], median_chars_per_s: speeds[Math.floor(speeds.length / 2)] }));
}
