//! Packing GGUF weights into a [`QMatrix`] and reading them back as f32 (dequantization).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use half::f16;

#[cfg(target_arch = "x86_64")]
use super::{isa, x86, Isa};
use super::{Activations, Packed, QMatrix, BLOCK};

impl QMatrix {
    /// A dense matrix from row-major data.
    pub fn dense(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "dense matrix data does not match its shape");
        Self { rows, cols, packed: Packed::F32(data), activations: Activations::F32 }
    }

    /// Keeps Q4_1 and Q8_0 packed; any other GGML type is dequantized to f32.
    pub fn from_qtensor(qt: &QTensor) -> candle_core::Result<Self> {
        let (rows, cols) = qt.shape().dims2()?;
        let packable = cols % BLOCK == 0;
        match qt.dtype() {
            GgmlDType::Q4_1 if packable => Ok(Self::from_q4_1_bytes(&qt.data()?, rows, cols)),
            GgmlDType::Q8_0 if packable => Ok(Self::from_q8_0_bytes(&qt.data()?, rows, cols)),
            _ => {
                let t = qt.dequantize(&Device::Cpu)?;
                Ok(Self::dense(t.flatten_all()?.to_vec1::<f32>()?, rows, cols))
            }
        }
    }

    /// Repacks GGML Q4_1 blocks (`f16 d, f16 m, [u8; 16]`, 20 bytes each).
    pub fn from_q4_1_bytes(bytes: &[u8], rows: usize, cols: usize) -> Self {
        let blocks = rows * cols / BLOCK;
        assert_eq!(bytes.len(), blocks * 20, "Q4_1 data does not match its shape");
        let mut d = Vec::with_capacity(blocks);
        let mut m = Vec::with_capacity(blocks);
        let mut qs = Vec::with_capacity(blocks * 16);
        for b in bytes.chunks_exact(20) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            m.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
            qs.extend_from_slice(&b[4..20]);
        }
        Self { rows, cols, packed: Packed::Q4_1 { d, m, qs }, activations: Activations::F32 }
    }

    /// Repacks GGML Q8_0 blocks (`f16 d, [i8; 32]`, 34 bytes each).
    pub fn from_q8_0_bytes(bytes: &[u8], rows: usize, cols: usize) -> Self {
        let blocks = rows * cols / BLOCK;
        assert_eq!(bytes.len(), blocks * 34, "Q8_0 data does not match its shape");
        let mut d = Vec::with_capacity(blocks);
        let mut qs = Vec::with_capacity(blocks * BLOCK);
        for b in bytes.chunks_exact(34) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            qs.extend(b[2..34].iter().map(|&v| v as i8));
        }
        Self { rows, cols, packed: Packed::Q8_0 { d, qs }, activations: Activations::F32 }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Chooses what decode steps (up to 32 rows) multiply this matrix's packed weights
    /// against; dense matrices and prompts always take f32.
    pub fn set_activations(&mut self, activations: Activations) {
        self.activations = activations;
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight data held.
    pub fn bytes(&self) -> usize {
        match &self.packed {
            Packed::Q4_1 { d, m, qs } => (d.len() + m.len()) * 4 + qs.len(),
            Packed::Q8_0 { d, qs } => d.len() * 4 + qs.len(),
            Packed::F32(v) => v.len() * 4,
        }
    }

    /// The matrix's rows one after another (`self` first), when both are stored alike;
    /// otherwise both are made dense first. Used to fuse q/k/v and gate/up into one matmul.
    pub fn concat_rows(parts: &[&QMatrix]) -> QMatrix {
        let cols = parts[0].cols;
        assert!(parts.iter().all(|p| p.cols == cols), "fused matrices need the same input width");
        let rows = parts.iter().map(|p| p.rows).sum();
        let kind = |p: &QMatrix| std::mem::discriminant(&p.packed);
        if parts.iter().all(|p| kind(p) == kind(parts[0])) {
            let packed = match &parts[0].packed {
                Packed::Q4_1 { .. } => {
                    let (mut d, mut m, mut qs) = (Vec::new(), Vec::new(), Vec::new());
                    for p in parts {
                        if let Packed::Q4_1 { d: pd, m: pm, qs: pq } = &p.packed {
                            d.extend_from_slice(pd);
                            m.extend_from_slice(pm);
                            qs.extend_from_slice(pq);
                        }
                    }
                    Packed::Q4_1 { d, m, qs }
                }
                Packed::Q8_0 { .. } => {
                    let (mut d, mut qs) = (Vec::new(), Vec::new());
                    for p in parts {
                        if let Packed::Q8_0 { d: pd, qs: pq } = &p.packed {
                            d.extend_from_slice(pd);
                            qs.extend_from_slice(pq);
                        }
                    }
                    Packed::Q8_0 { d, qs }
                }
                Packed::F32(_) => {
                    let mut v = Vec::with_capacity(rows * cols);
                    for p in parts {
                        if let Packed::F32(pv) = &p.packed {
                            v.extend_from_slice(pv);
                        }
                    }
                    Packed::F32(v)
                }
            };
            return QMatrix { rows, cols, packed, activations: parts[0].activations };
        }
        let mut v = Vec::with_capacity(rows * cols);
        for p in parts {
            v.extend_from_slice(&p.to_dense());
        }
        QMatrix::dense(v, rows, cols)
    }

    /// Every element as f32, row-major.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.rows_into(0, self.rows, &mut out);
        out
    }

    /// Dequantizes row `r` into `out` (`cols` floats): the embedding lookup.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        self.rows_into(r, r + 1, out);
    }

    /// Dequantizes rows `r0..r1` into `out`, row-major. The arithmetic is the same as
    /// candle's `dequantize`, so these values equal the dense weights bit for bit.
    pub(super) fn rows_into(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let cols = self.cols;
        let out = &mut out[..(r1 - r0) * cols];
        match &self.packed {
            Packed::F32(v) => out.copy_from_slice(&v[r0 * cols..r1 * cols]),
            Packed::Q4_1 { d, m, qs } => {
                let b0 = r0 * cols / BLOCK;
                let b1 = r1 * cols / BLOCK;
                #[cfg(target_arch = "x86_64")]
                match isa() {
                    // SAFETY: the ISA was detected; the slices cover blocks b0..b1 and `out`.
                    Isa::Avx512 => {
                        return unsafe { x86::dequant_q4_1_avx512(&qs[b0 * 16..b1 * 16], &d[b0..b1], &m[b0..b1], out) }
                    }
                    // SAFETY: as above.
                    Isa::Avx2 => {
                        return unsafe { x86::dequant_q4_1_avx2(&qs[b0 * 16..b1 * 16], &d[b0..b1], &m[b0..b1], out) }
                    }
                    Isa::Portable => {}
                }
                for (i, dst) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let b = b0 + i;
                    let (db, mb) = (d[b], m[b]);
                    let q = &qs[b * 16..b * 16 + 16];
                    for j in 0..16 {
                        dst[j] = (q[j] & 0x0F) as f32 * db + mb;
                        dst[j + 16] = (q[j] >> 4) as f32 * db + mb;
                    }
                }
            }
            Packed::Q8_0 { d, qs } => {
                let b0 = r0 * cols / BLOCK;
                let b1 = r1 * cols / BLOCK;
                #[cfg(target_arch = "x86_64")]
                match isa() {
                    // SAFETY: as above.
                    Isa::Avx512 => {
                        return unsafe { x86::dequant_q8_0_avx512(&qs[b0 * BLOCK..b1 * BLOCK], &d[b0..b1], out) }
                    }
                    // SAFETY: as above.
                    Isa::Avx2 => {
                        return unsafe { x86::dequant_q8_0_avx2(&qs[b0 * BLOCK..b1 * BLOCK], &d[b0..b1], out) }
                    }
                    Isa::Portable => {}
                }
                for (i, dst) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let b = b0 + i;
                    let db = d[b];
                    for (o, &q) in dst.iter_mut().zip(&qs[b * BLOCK..(b + 1) * BLOCK]) {
                        *o = q as f32 * db;
                    }
                }
            }
        }
    }
}
