//! Served LoRA weights as the kernels read them: f32 or bf16 views, and `scale·Bᵀ` in panels.

/// Output columns per panel of a served pair's `scale·Bᵀ` (one 8-lane vector).
pub const PANEL: usize = 8;

/// A pair's served weights, in the precision chosen at load.
#[derive(Debug, Clone, Copy)]
pub enum Served<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Served<'_> {
    /// Address of the data: equal for two views of the same weights.
    pub fn as_ptr(&self) -> *const u8 {
        match self {
            Served::F32(v) => v.as_ptr().cast(),
            Served::Bf16(v) => v.as_ptr().cast(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Served::F32(v) => v.len(),
            Served::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as f32 (exact for bf16).
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Served::F32(v) => v[i],
            Served::Bf16(v) => v[i].f32(),
        }
    }
}

/// An element of served LoRA weights, widened to f32 in registers.
pub trait Weight: Copy + Send + Sync {
    fn f32(self) -> f32;

    /// `values` as f32: the slice itself when it already is, else widened into `buf`
    /// (which must be at least as long).
    fn widened<'a>(values: &'a [Self], buf: &'a mut [std::mem::MaybeUninit<f32>]) -> &'a [f32];
}

impl Weight for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn widened<'a>(values: &'a [f32], _: &'a mut [std::mem::MaybeUninit<f32>]) -> &'a [f32] {
        values
    }
}

/// A bf16 bit pattern: its f32 value is the same bits shifted up (exact).
impl Weight for u16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }

    #[inline(always)]
    fn widened<'a>(values: &'a [u16], buf: &'a mut [std::mem::MaybeUninit<f32>]) -> &'a [f32] {
        let buf = &mut buf[..values.len()];
        for (w, &v) in buf.iter_mut().zip(values) {
            w.write(v.f32());
        }
        // SAFETY: every element of `buf` was written just above, and MaybeUninit<f32> has
        // f32's layout.
        unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<f32>(), buf.len()) }
    }
}

/// The bf16 bit pattern nearest to `v` (ties to even; NaN stays NaN).
pub fn to_bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}
