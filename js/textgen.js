// @ts-check
/**
 * textgen's generator in JavaScript: the format of docs/format.md on onnxruntime-node or
 * onnxruntime-web, no build step. The same prompt, settings and seed give the same text as the
 * Python generator (`from textgen import Generator`); the conformance vectors check it.
 *
 *   import * as ort from 'onnxruntime-node';          // or 'onnxruntime-web' (wasm)
 *   import { Generator } from './textgen.js';
 *   const gen = await Generator.load(ort, 'model.onnx');   // a path (node), a URL or the bytes
 *   const text = await gen.generate('alice was ', { maxChars: 200, temperature: 0.8, seed: 1,
 *                                                   onText: (t) => process.stdout.write(t) });
 */

export const NOISE_HASH32 = 'textgen-hash32-gumbel-v1';
export const READABLE_FORMAT_VERSIONS = [2];
export const FIRST_CHUNK = 8;
export const DEFAULT_CHUNK = 32;
const GREEDY = 0;
const HASH_SALT = 0x9e3779b9;
const STEP_OUTPUTS = ['sampled_ids'];

/**
 * @typedef {object} Options
 * @property {number} [maxChars] characters to generate (default 500)
 * @property {number} [temperature] 0 = greedy (default 0.8)
 * @property {number} [topK] 0 = off
 * @property {number} [topP] 1 = off
 * @property {number | bigint | string} [seed] fixes the text (sample i of a request with seed s: s + i)
 * @property {string | string[]} [stop] generation ends where the text ends with one (not included)
 * @property {'error' | 'skip' | 'replace'} [unknown] prompt characters outside the vocabulary
 * @property {string} [replacement] what `replace` puts in their place (default a space)
 * @property {(text: string) => void} [onText] streaming: called with new characters as they are made
 */

/**
 * @typedef {object} ModelInfo
 * @property {string[]} vocab index = id
 * @property {boolean} lowercase
 * @property {string[]} stateInputs
 * @property {string[]} stateOutputs
 * @property {number[]} stateSizes
 * @property {number} formatVersion
 * @property {string} noise
 * @property {Record<string, any>} metadata every value of the `metadata_json` output
 */

// -------------------------------------------------------------------------------------------
// The noise: textgen-hash32-gumbel-v1 (docs/format.md, "Noise")

/** lowbias32, on uint32 values. @param {number} x @returns {number} */
export function lowbias32(x) {
  x = (x ^ (x >>> 16)) >>> 0;
  x = Math.imul(x, 0x7feb352d) >>> 0;
  x = (x ^ (x >>> 15)) >>> 0;
  x = Math.imul(x, 0x846ca68b) >>> 0;
  return (x ^ (x >>> 16)) >>> 0;
}

const SQRT_HALF = 0.7071067811865476;
const LN2 = 0.6931471805599453;
const LOG_SERIES = [7, 6, 5, 4, 3, 2, 1].map((i) => 1 / (2 * i + 1)); // 1/15, ..., 1/3
const F64 = new Float64Array(1);
const F64_WORDS = new Uint32Array(F64.buffer); // little-endian: [low word, high word]

/** ln(x) for a normal x > 0 with IEEE-754 +, -, *, / only, in docs/format.md's order (not Math.log:
 * its last bit differs between engines). @param {number} x */
export function portableLog(x) {
  F64[0] = x;
  const hi = F64_WORDS[1];
  let e = ((hi >>> 20) & 0x7ff) - 1022; // frexp: x = m * 2**e, m in [0.5, 1)
  F64_WORDS[1] = (hi & 0x800fffff) | (1022 << 20);
  let m = F64[0];
  if (m < SQRT_HALF) { m *= 2; e -= 1; }
  const s = (m - 1) / (m + 1), z = s * s;
  let p = LOG_SERIES[0];
  for (let i = 1; i < LOG_SERIES.length; i++) p = p * z + LOG_SERIES[i];
  const r = s * 2;
  return e * LN2 + (r + r * (z * p));
}

/** The Gumbel value of a 32-bit hash: its top 24 bits k, u = (k + 0.5) / 2**24. @param {number} h */
export function gumbelOfHash(h) {
  const u = ((h >>> 8) + 0.5) / 16777216;
  return Math.fround(-portableLog(-portableLog(u)));
}

/** A row's 32-bit key from its seed (mod 2**64). @param {number | bigint | string} seed */
export function rowKey(seed) {
  const r = BigInt.asUintN(64, BigInt(seed));
  const lo = Number(r & 0xffffffffn), hi = Number(r >> 32n);
  return lowbias32((lowbias32((lo ^ HASH_SALT) >>> 0) ^ hi) >>> 0);
}

/** The noise of one row: `take(K, V)` gives its next K positions, K x V float32. */
export class HashNoise {
  /** @param {number | bigint | string} seed */
  constructor(seed) {
    this.key = rowKey(seed);
    this.position = 0;
  }

  /** @param {number} steps @param {number} vocabSize @param {Float32Array} [out] */
  take(steps, vocabSize, out = new Float32Array(steps * vocabSize)) {
    for (let j = 0; j < steps; j++) {
      const a = lowbias32((this.key ^ ((this.position + j) >>> 0)) >>> 0);
      for (let v = 0; v < vocabSize; v++) out[j * vocabSize + v] = gumbelOfHash(lowbias32((a ^ v) >>> 0));
    }
    this.position += steps;
    return out;
  }
}

// -------------------------------------------------------------------------------------------
// Prompts and stop strings (as textgen.text and serve.params)

/** The start character of an empty prompt. @param {string[]} vocab */
export function startChar(vocab) {
  return vocab.includes('\n') ? '\n' : vocab.includes(' ') ? ' ' : vocab[0];
}

/**
 * The ids a prompt is fed as (code points; lowercased if the model is; unknown characters by policy).
 * @param {ModelInfo} info @param {string} prompt @param {Options} opts
 */
export function encodePrompt(info, prompt, opts = {}) {
  const index = new Map(info.vocab.map((c, i) => [c, i]));
  const policy = opts.unknown ?? 'error', replacement = opts.replacement ?? ' ';
  const chars = Array.from(info.lowercase ? prompt.toLowerCase() : prompt);
  const unknown = [...new Set(chars.filter((c) => !index.has(c)))];
  if (unknown.length && policy === 'error') throw new Error(`the prompt has characters the model does not know: ${JSON.stringify(unknown)}`);
  if (unknown.length && policy === 'replace' && !index.has(replacement)) throw new Error(`replacement ${JSON.stringify(replacement)} is not in the vocabulary`);
  /** @type {number[]} */
  const ids = [];
  for (const c of chars) {
    const id = index.get(c) ?? (policy === 'replace' ? index.get(replacement) : undefined);
    if (id !== undefined) ids.push(id);
  }
  return ids.length ? ids : [/** @type {number} */ (index.get(startChar(info.vocab)))];
}

/** Stop strings over code points: where the text first ends with one, and what to hold back. */
export class StopStrings {
  /** @param {string | string[] | undefined} stop */
  constructor(stop) {
    this.stops = (stop === undefined ? [] : typeof stop === 'string' ? [stop] : stop).map((s) => Array.from(s));
    if (this.stops.some((s) => s.length === 0)) throw new Error('a stop string must not be empty');
    this.longest = Math.max(0, ...this.stops.map((s) => s.length));
  }

  /** [end, length] of the first place where chars[0:end] ends with a stop string starting at `from` or later. @param {string[]} chars @param {number} from */
  findFirst(chars, from) {
    /** @type {[number, number] | null} */
    let best = null;
    for (const s of this.stops) {
      for (let end = from + s.length; end <= chars.length && (!best || end < best[0]); end++) {
        if (s.every((c, k) => chars[end - s.length + k] === c)) { best = [end, s.length]; break; }
      }
    }
    return best;
  }

  /** Length of the longest tail of `chars` that is a proper prefix of a stop string. @param {string[]} chars */
  heldTail(chars) {
    for (let k = Math.min(chars.length, this.longest - 1); k > 0; k--) {
      const tail = chars.slice(chars.length - k);
      if (this.stops.some((s) => s.length > k && tail.every((c, i) => s[i] === c))) return k;
    }
    return 0;
  }
}

// -------------------------------------------------------------------------------------------
// The model

/** @param {any} ort @param {string | Uint8Array | ArrayBuffer} source @param {object} [options] */
async function createSession(ort, source, options = {}) {
  if (typeof source === 'string' && typeof window !== 'undefined') { // a URL, relative to the page
    source = new Uint8Array(await (await fetch(source)).arrayBuffer());
  }
  return ort.InferenceSession.create(source, { graphOptimizationLevel: 'all', intraOpNumThreads: 1,
    interOpNumThreads: 1, executionMode: 'sequential', ...options });
}

/** @param {Record<string, any>} m @returns {ModelInfo} */
function infoOf(m) {
  const version = m['textgen.format_version'];
  if (!READABLE_FORMAT_VERSIONS.includes(version)) throw new Error(`format version ${version}: this generator reads ${READABLE_FORMAT_VERSIONS.join(', ')}`);
  const noise = m['textgen.generation'].noise;
  if (noise !== NOISE_HASH32) throw new Error(`noise ${noise}: this generator makes ${NOISE_HASH32}`);
  return { vocab: m['textgen.vocab'], lowercase: m['textgen.lowercase'], stateInputs: m['textgen.state_inputs'],
    stateOutputs: m['textgen.state_outputs'], stateSizes: m['textgen.state_sizes'], formatVersion: version, noise, metadata: m };
}

export class Model {
  /** @param {any} ort @param {any} session @param {ModelInfo} info */
  constructor(ort, session, info) {
    this.ort = ort;
    this.session = session;
    this.info = info;
    this.outputs = [...STEP_OUTPUTS, ...info.stateOutputs];
  }

  /** Open a model; its metadata comes from one cheap call (B = 1, T = 1, K = 0) fetching `metadata_json`. @param {any} ort @param {string | Uint8Array | ArrayBuffer} source @param {object} [options] */
  static async load(ort, source, options) {
    const session = await createSession(ort, source, options);
    const sizes = session.inputMetadata.filter((/** @type {any} */ m) => /^[hc]_\d+$/.test(m.name)).map((/** @type {any} */ m) => m.shape[1]);
    const vocabSize = session.outputMetadata.find((/** @type {any} */ m) => m.name === 'logits').shape[2];
    const probe = { stateInputs: session.inputNames.filter((/** @type {string} */ n) => /^[hc]_\d+$/.test(n)), stateSizes: sizes };
    const feed = feeds(ort, probe, [0], 1, zeroState(probe.stateSizes), new Float32Array(0), 0, vocabSize, {});
    const out = await session.run(feed, ['metadata_json']);
    const json = new TextDecoder().decode(/** @type {Uint8Array} */ (out.metadata_json.data));
    return new Model(ort, session, infoOf(JSON.parse(json)));
  }

  get vocabSize() { return this.info.vocab.length; }

  /** One call: consume `ids`, then sample K characters. @param {number[]} ids @param {Float32Array[]} state @param {Float32Array} noise @param {number} steps @param {{temperature?: number, topK?: number, topP?: number}} settings */
  async chunk(ids, state, noise, steps, settings) {
    const feed = feeds(this.ort, this.info, ids, ids.length, state, noise, steps, this.vocabSize, settings);
    const out = await this.session.run(feed, this.outputs);
    return { ids: Array.from(/** @type {Int32Array} */ (out.sampled_ids.data)), state: this.info.stateOutputs.map((n) => /** @type {Float32Array} */ (out[n].data)) };
  }

  /** The logits (V,) after `ids` from the zero state (K = 0). @param {number[]} ids */
  async lastLogits(ids) {
    const feed = feeds(this.ort, this.info, ids, ids.length, zeroState(this.info.stateSizes), new Float32Array(0), 0, this.vocabSize, {});
    const out = await this.session.run(feed, ['logits']);
    return /** @type {Float32Array} */ (out.logits.data).slice((ids.length - 1) * this.vocabSize);
  }
}

/** @param {number[]} sizes */
function zeroState(sizes) { return sizes.map((h) => new Float32Array(h)); }

/** The feeds of one call of one row. @param {any} ort @param {{stateInputs: string[], stateSizes: number[]}} info @param {number[]} ids @param {number} t @param {Float32Array[]} state @param {Float32Array} noise @param {number} steps @param {number} v @param {{temperature?: number, topK?: number, topP?: number}} s */
function feeds(ort, info, ids, t, state, noise, steps, v, s) {
  /** @type {Record<string, any>} */
  const feed = { char_ids: new ort.Tensor('int32', Int32Array.from(ids), [1, t]),
    sample_noise: new ort.Tensor('float32', noise, [1, steps, v]),
    temperature: new ort.Tensor('float32', Float32Array.of(s.temperature ?? 1), [1]),
    top_k: new ort.Tensor('int64', BigInt64Array.of(BigInt(s.topK ?? 0)), [1]),
    top_p: new ort.Tensor('float32', Float32Array.of(s.topP ?? 1), [1]) };
  info.stateInputs.forEach((name, i) => { feed[name] = new ort.Tensor('float32', state[i], [1, info.stateSizes[i]]); });
  return feed;
}

// -------------------------------------------------------------------------------------------
// The generator

/** A random 63-bit seed. */
function freshSeed() {
  const words = crypto.getRandomValues(new Uint32Array(2));
  return (BigInt(words[0] & 0x7fffffff) << 32n) | BigInt(words[1]);
}

/** The rules of serve.params, for the settings a port passes to the graph. @param {Options} o */
export function checkOptions(o) {
  const bad = (/** @type {string} */ what) => { throw new RangeError(what); };
  if (o.maxChars !== undefined && !(Number.isInteger(o.maxChars) && o.maxChars >= 0)) bad(`maxChars must be an integer >= 0, got ${o.maxChars}`);
  if (o.temperature !== undefined && !(Number.isFinite(o.temperature) && o.temperature >= 0)) bad(`temperature must be >= 0 (0 = greedy), got ${o.temperature}`);
  if (o.topK !== undefined && !(Number.isInteger(o.topK) && o.topK >= 0)) bad(`topK must be an integer >= 0 (0 = off), got ${o.topK}`);
  if (o.topP !== undefined && !(o.topP > 0 && o.topP <= 1)) bad(`topP must be in (0, 1] (1 = off), got ${o.topP}`);
  if (o.seed !== undefined && !(BigInt(o.seed) >= 0n)) bad(`seed must be an integer >= 0, got ${o.seed}`);
}

export class Generator {
  /** @param {Model} model @param {{chunkSize?: number}} [options] */
  constructor(model, options = {}) {
    this.model = model;
    this.chunkSize = options.chunkSize ?? DEFAULT_CHUNK;
  }

  /** @param {any} ort @param {string | Uint8Array | ArrayBuffer} source @param {{chunkSize?: number, session?: object}} [options] */
  static async load(ort, source, options = {}) {
    return new Generator(await Model.load(ort, source, options.session), options);
  }

  get info() { return this.model.info; }

  /** The continuation of `prompt` (the prompt not included). @param {string} prompt @param {Options} [opts] */
  async generate(prompt = '', opts = {}) {
    checkOptions(opts);
    const maxChars = opts.maxChars ?? 500, temperature = opts.temperature ?? 0.8;
    const settings = { temperature, topK: opts.topK ?? 0, topP: opts.topP ?? 1 };
    const stops = new StopStrings(opts.stop);
    const noise = temperature === GREEDY ? null : new HashNoise(opts.seed ?? freshSeed());
    const vocab = this.info.vocab, v = this.model.vocabSize;
    let pending = encodePrompt(this.info, prompt, opts), state = zeroState(this.info.stateSizes);
    /** @type {string[]} */
    const chars = [];
    let sent = 0, chunk = FIRST_CHUNK, end = -1;
    while (chars.length < maxChars && end < 0) {
      const steps = Math.min(chunk, maxChars - chars.length);
      const out = await this.model.chunk(pending, state, noise ? noise.take(steps, v) : new Float32Array(steps * v), steps, settings);
      const from = Math.max(0, chars.length - (stops.longest - 1));
      for (const id of out.ids) chars.push(vocab[id]);
      const found = stops.longest ? stops.findFirst(chars, from) : null;
      if (found) { end = found[0] - found[1]; chars.length = end; }
      const ready = end >= 0 || chars.length >= maxChars ? chars.length : chars.length - stops.heldTail(chars);
      if (opts.onText && ready > sent) opts.onText(chars.slice(sent, ready).join(''));
      sent = Math.max(sent, ready);
      pending = [out.ids[out.ids.length - 1]];
      state = out.state;
      chunk = this.chunkSize;
    }
    return chars.join('');
  }
}
