// tokenizer.js — tekken.json decode (mirror of voxtral_wgpu/tokenizer.py): ids below num_special
// produce no text; text ids are base64 byte pieces, decoded as UTF-8 incrementally.
const DEPRECATED = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
  "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]",
  "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"];
const DEFAULT_IDS = { "<s>": 1, "</s>": 2, "[STREAMING_PAD]": 32 };

function b64(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export class Tekken {
  constructor(data) {
    const config = data.config || {};
    this.numSpecial = config.default_num_special_tokens ?? 1000;
    const vocabSize = config.default_vocab_size ?? this.numSpecial + data.vocab.length;
    const nInner = vocabSize - this.numSpecial;
    if (nInner < 0 || nInner > data.vocab.length) throw new Error("tekken.json: vocab too short for default_vocab_size");
    this.pieces = data.vocab.slice(0, nInner).map((e) => b64(e.token_bytes));
    this.vocabSize = vocabSize;
    const names = Array.from({ length: this.numSpecial }, (_, i) => `<SPECIAL_${i}>`);
    if (!data.special_tokens) DEPRECATED.slice(0, this.numSpecial).forEach((n, i) => (names[i] = n));
    else for (const e of data.special_tokens) names[e.rank] = e.token_str;
    this.specials = names;
    const ids = new Map(names.map((n, i) => [n, i]));
    const id = (n) => (ids.has(n) ? ids.get(n) : DEFAULT_IDS[n]);
    this.bosId = id("<s>");
    this.eosId = id("</s>");
    this.streamingPadId = id("[STREAMING_PAD]");
    this.streamingWordId = ids.get("[STREAMING_WORD]") ?? null;
    const a = data.audio || {};
    this.audio = {
      transcription_delay_ms: a.transcription_delay_ms ?? 480,
      streaming_n_left_pad_tokens: a.streaming_n_left_pad_tokens ?? 32,
      sampling_rate: a.sampling_rate ?? 16000,
    };
  }
  static async fetch(url) {
    const r = await fetch(url);
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return new Tekken(await r.json());
  }
  tokenBytes(i) {
    if (!(i >= 0 && i < this.vocabSize)) throw new Error(`token id ${i} out of range`);
    return i >= this.numSpecial ? this.pieces[i - this.numSpecial] : new Uint8Array(0);
  }
  decode(ids) {
    const d = this.stream();
    return ids.map((i) => d.push(i)).join("") + d.flush();
  }
  stream() { return new StreamingDecoder(this); }
}

/** Ids -> text one at a time; an incomplete UTF-8 sequence is held back until completed. */
export class StreamingDecoder {
  constructor(tok) { this.tok = tok; this.utf8 = new TextDecoder("utf-8", { fatal: false }); }
  push(id) {
    const b = this.tok.tokenBytes(id);
    return b.length ? this.utf8.decode(b, { stream: true }) : "";
  }
  flush() { const t = this.utf8.decode(); this.utf8 = new TextDecoder("utf-8"); return t; }
}
