// _half.wgsl — IEEE half -> f32 for the shaders that read GGML f16 block scales (linear_quant,
// matmul, embed_quant), written once. Not a module: a shader takes it in with the line
//   // #include "_half.wgsl"
// which the loaders replace with this file (voxtral_wgpu/gpu.py read_shader, web/gpu.js).
//
//   half_bits(h): the f32 of the half whose bits are h & 0xffff
//   Integer ops, no branches: exact for normals, subnormals, zeros, infinities and NaNs on every
//   device (unpack2x16float may flush f16 subnormals; the subnormal case here is an exact f32
//   subtraction, so no f32 denormal is ever produced or read).
//
// Bindings: none.

fn half_bits(h: u32) -> f32 {
    let o = ((h & 0x7fffu) << 13u) + 0x38000000u;  // rebias the exponent 15 -> 127
    let e = h & 0x7c00u;
    var f = bitcast<f32>(o);
    f = select(f, bitcast<f32>(o + 0x00800000u) - 6.103515625e-05, e == 0u);  // (1 + m/1024) 2^-14 - 2^-14
    f = select(f, bitcast<f32>(o + 0x38000000u), e == 0x7c00u);  // exponent 255
    return bitcast<f32>(bitcast<u32>(f) | ((h & 0x8000u) << 16u));
}
