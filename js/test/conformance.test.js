// The conformance vectors (python -m serve.vectors) under Node, with onnxruntime-node and
// onnxruntime-web (wasm). TEXTGEN_MODEL and TEXTGEN_VECTORS name the files (tests/test_js.py sets
// them); without them these tests are skipped.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';

import { RUNTIMES } from '../runtimes.js';
import { encodePrompt, Generator, gumbelOfHash, HashNoise, lowbias32 } from '../textgen.js';

const MODEL = process.env.TEXTGEN_MODEL;
const VECTORS = process.env.TEXTGEN_VECTORS;
const skip = !MODEL || !VECTORS ? 'TEXTGEN_MODEL and TEXTGEN_VECTORS are not set' : false;
const vectors = skip ? null : JSON.parse(readFileSync(/** @type {string} */ (VECTORS), 'utf8'));

/** @param {Record<string, any>} o the Python keyword options -> the JS ones */
function jsOptions(o) {
  return { maxChars: o.max_chars, temperature: o.temperature, topK: o.top_k, topP: o.top_p, seed: o.seed,
    stop: o.stop, unknown: o.unknown, replacement: o.replacement };
}

test('lowbias32 is C uint32 arithmetic', () => {
  assert.deepEqual([0, 1, 0xffffffff, 0x9e3779b9].map(lowbias32), [0, 0x688990c0, 0x6768824a, 0x1fce552]);
});

test('every Gumbel value of the 24-bit table is the documented one', { skip }, () => {
  const table = new Float32Array(1 << 24);
  for (let k = 0; k < table.length; k++) table[k] = gumbelOfHash(k << 8 >>> 0);
  const digest = createHash('sha256').update(new Uint8Array(table.buffer)).digest('hex');
  assert.equal(digest, vectors.gumbel_table_sha256);
});

test('noise samples', { skip }, () => {
  for (const s of vectors.noise_samples) {
    const noise = new HashNoise(s.seed);
    noise.take(s.position, 1);
    const row = noise.take(1, s.index + 1);
    assert.equal(row[s.index], s.value, JSON.stringify(s));
  }
});

for (const [name, importOrt] of Object.entries(RUNTIMES)) {
  test(`the vectors' texts and first logits with ${name}`, { skip }, async () => {
    const ort = await importOrt();
    const gen = await Generator.load(ort, new Uint8Array(readFileSync(/** @type {string} */ (MODEL))));
    assert.equal(gen.info.noise, vectors.noise);
    for (const [i, c] of vectors.cases.entries()) {
      const pieces = [];
      const text = await gen.generate(c.prompt, { ...jsOptions(c.options), onText: (t) => pieces.push(t) });
      assert.equal(text, c.text, `case ${i}`);
      assert.equal(pieces.join(''), c.text, `case ${i} streamed`);
      const logits = await gen.model.lastLogits(encodeFor(gen, c));
      const diff = Math.max(...c.first_logits.map((/** @type {number} */ x, /** @type {number} */ k) => Math.abs(x - logits[k])));
      assert.ok(diff <= vectors.logits_tolerance, `case ${i}: first logits differ by ${diff}`);
    }
  });
}

/** @param {Generator} gen @param {any} c */
function encodeFor(gen, c) { return encodePrompt(gen.info, c.prompt, jsOptions(c.options)); }

test('settings outside the Python rules are refused before any call', async () => {
  const { checkOptions } = await import('../textgen.js');
  for (const bad of [{ temperature: -1 }, { topK: 1.5 }, { topP: 0 }, { topP: 1.2 }, { maxChars: -3 }, { seed: -1 }]) {
    assert.throws(() => checkOptions(bad), RangeError, JSON.stringify(bad));
  }
  checkOptions({ temperature: 0, topK: 0, topP: 1, maxChars: 0, seed: '9223372036854775807' });
});
