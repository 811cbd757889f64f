// _epilogue.wgsl — the output step of the linear-layer shaders (linear, linear_quant, matmul,
// matvec), written once. Not a module: a shader takes it in with the line
//   // #include "_epilogue.wgsl"
// which the loaders replace with this file (voxtral_wgpu/gpu.py read_shader, web/gpu.js; WGSL has
// no include of its own).
//
//   epilogue(m, n, acc): y[y_off + m*ldy + n] = act(acc + bias[b_off + n]) (+ y[...] as it was)
//   act (p.act): 0 identity, 1 GELU, erf form (erf_approx, |error| < 1.2e-7), 2 SiLU; the bias only
//   with p.has_bias != 0, the accumulation only with p.accumulate != 0.
//
// Bindings: none of its own; it uses the including shader's
//   p     uniform Params with u32 fields has_bias, b_off, act, y_off, ldy, accumulate
//   bias  array<f32>  [..] (read when has_bias != 0)
//   y     array<f32>  read_write output

// erf with |error| < 1.2e-7 (Numerical Recipes erfc, Chebyshev fit); WGSL has no erf built-in.
fn erf_approx(v: f32) -> f32 {
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
            t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
            t * (-0.82215223 + t * 0.17087277)))))))));
    return select(r - 1.0, 1.0 - r, v >= 0.0);
}

fn epilogue(m: u32, n: u32, acc: f32) {
    var v = acc;
    if (p.has_bias != 0u) {
        v = v + bias[p.b_off + n];
    }
    if (p.act == 1u) {
        v = 0.5 * v * (1.0 + erf_approx(v * 0.70710678118654752));
    } else if (p.act == 2u) {
        v = v / (1.0 + exp(-v));
    }
    let i = p.y_off + m * p.ldy + n;
    if (p.accumulate != 0u) {
        v = v + y[i];
    }
    y[i] = v;
}
