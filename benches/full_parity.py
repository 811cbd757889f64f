"""Full-size parity with HF transformers on the GPU: ``python benches/full_parity.py TEKKEN_DIR [seconds]``.

Builds HF ``VoxtralRealtimeForConditionalGeneration`` at the published 4B shapes with random
bf16-exact weights (float32 on CUDA, eager attention), writes it as a Mistral-native checkpoint
(BF16, interleaved q/k), loads that with voxtral_wgpu, and compares on the same audio: the audio
embeddings (encoder + adapter), teacher-forced logits, and free-running greedy ids.
Needs torch with CUDA, transformers with VoxtralRealtime, and tests/hf_reference.py on the path.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_reference import (TinySpec, new_hf_model, randomize_, synth_audio, streaming_pad_amounts,  # noqa: E402
                          write_native_checkpoint)

FULL = TinySpec(enc_dim=1280, enc_layers=32, enc_heads=32, enc_head_dim=64, enc_hidden=5120, enc_window=750,
                dec_dim=3072, dec_layers=26, dec_heads=32, dec_kv_heads=8, dec_head_dim=128, dec_hidden=9216,
                dec_window=8192, n_inner=130072, seed=1234, embed_std=0.1)


def main():
    tekken_dir, seconds = Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    out = Path("/tmp/voxtral_full")
    t = time.perf_counter()
    torch.set_num_threads(16)
    model = new_hf_model(FULL)
    randomize_(model, FULL)
    write_native_checkpoint(model, FULL, out)
    shutil.copy(tekken_dir / "tekken.json", out / "tekken.json")
    model = model.cuda()
    print(f"built and wrote the full-size checkpoint in {time.perf_counter() - t:.0f} s", flush=True)

    from transformers import VoxtralRealtimeFeatureExtractor

    audio = synth_audio(seconds)
    left, right = streaming_pad_amounts(len(audio), 480)
    padded = np.pad(audio, (left, right))
    mel = VoxtralRealtimeFeatureExtractor()(padded, sampling_rate=16000, return_tensors="pt")["input_features"]
    n_pos = mel.shape[-1] // 8
    prompt = [1] + [32] * 38
    with torch.no_grad():
        g = model.generate(input_ids=torch.tensor([prompt], device="cuda"), input_features=mel.cuda(),
                           num_delay_tokens=6, max_length=n_pos, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        seq = g.sequences[0].tolist()
        hf_ids = seq[len(prompt):]
        hf_ids = hf_ids[: hf_ids.index(2)] if 2 in hf_ids else hf_ids
        lg = torch.cat(g.logits, 0)
        top2 = lg.topk(2, dim=-1).values
        margins = (top2[:, 0] - top2[:, 1]).cpu().numpy()
        full_ids = seq
        tf = model(input_ids=torch.tensor([full_ids], device="cuda"), input_features=mel[..., : len(full_ids) * 8].cuda(),
                   num_delay_tokens=6).logits[0].float().cpu().numpy()
        emb = model.model.get_audio_features(input_features=mel.cuda()).pooler_output[0].float().cpu().numpy()
    del model
    torch.cuda.empty_cache()

    import voxtral_wgpu
    from voxtral_wgpu.model import Session

    t = time.perf_counter()
    m = voxtral_wgpu.load(out, progress=False)
    print(f"voxtral_wgpu loaded the BF16 checkpoint in {time.perf_counter() - t:.1f} s", flush=True)
    ours_mel = mel[0].T.numpy()
    s = Session(m, 6)
    s.taps = {}
    s.push_mel(ours_mel)
    s.close(n_pos)
    s.encode_available()
    while s.positions_encoded < n_pos:
        s.next_pos = s.positions_encoded
        s.encode_available()
    ours_emb = np.concatenate(s.taps["adapter"])
    s.release()
    s = Session(m, 6)
    s.push_mel(ours_mel)
    ours_tf = s.teacher_forced_logits(full_ids)
    s.release()
    theirs_tf = tf[len(prompt) - 1: len(full_ids) - 1]
    tr = m.transcribe(audio)
    k = next((i for i, (a, b) in enumerate(zip(tr.token_ids, hf_ids)) if a != b), None)
    res = {
        "audio_s": seconds, "positions": n_pos,
        "audio_embeds_max_abs": float(np.abs(ours_emb - emb).max()), "audio_embeds_scale": float(np.abs(emb).max()),
        "logits_max_abs": float(np.abs(ours_tf - theirs_tf).max()), "logits_scale": float(np.abs(theirs_tf).max()),
        "teacher_forced_argmax_agree": float((ours_tf.argmax(-1) == theirs_tf.argmax(-1)).mean()),
        "ids_equal": tr.token_ids == hf_ids, "n_ids": len(hf_ids), "first_difference": k,
        "hf_margin_at_first_difference": None if k is None or k >= len(margins) else float(margins[k]),
        "min_hf_margin": float(margins.min()),
    }
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
