//! Chunking parameters: part of every manifest (two manifests compare only when built with
//! the same ones), so they live with the manifest; the chunker takes them from here.

use serde::{Deserialize, Serialize};

/// Zero detection works on aligned blocks of this many bytes: a zero extent always starts on a
/// multiple of it and ends on one (or at the end of the image).
pub const ZERO_BLOCK: u64 = 4096;

/// Chunking parameters. Two manifests can only be compared when they were built with the same
/// parameters, so the manifest file records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    /// Smallest data chunk FastCDC cuts (a chunk may be shorter only where a zero extent or the
    /// end of the image stops it).
    pub min_size: u32,
    /// Target average data chunk size.
    pub avg_size: u32,
    /// Largest data chunk.
    pub max_size: u32,
    /// Shortest run of zero bytes (in whole aligned blocks) recorded as a zero extent; shorter
    /// runs stay inside data chunks.
    pub zero_min: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            min_size: 16 * 1024,
            avg_size: 64 * 1024,
            max_size: 256 * 1024,
            zero_min: 16 * 1024,
        }
    }
}

/// Chunk parameters that make no sense.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    #[error(
        "chunk sizes must satisfy min < avg < max (got min {min}, avg {avg}, max {max}); \
         the defaults are 16 KiB / 64 KiB / 256 KiB"
    )]
    Order { min: u32, avg: u32, max: u32 },
    #[error("chunk {what} size {value} is out of range: it must be between {lo} and {hi} bytes")]
    Range {
        what: &'static str,
        value: u32,
        lo: u32,
        hi: u32,
    },
    #[error("chunk {what} size {value} must be even (FastCDC tests cut points in byte pairs)")]
    Odd { what: &'static str, value: u32 },
    #[error(
        "zero_min {0} must be a non-zero multiple of {ZERO_BLOCK} bytes (zero extents are \
         made of whole aligned blocks)"
    )]
    ZeroMin(u32),
}

impl ChunkParams {
    /// Parameters with the given sizes and the default zero threshold, validated.
    pub fn new(min_size: u32, avg_size: u32, max_size: u32) -> Result<Self, ParamsError> {
        let zero_min = min_size
            .next_multiple_of(ZERO_BLOCK as u32)
            .max(ZERO_BLOCK as u32);
        let p = ChunkParams {
            min_size,
            avg_size,
            max_size,
            zero_min: zero_min.min(ChunkParams::default().zero_min),
        };
        p.validate()?;
        Ok(p)
    }

    /// Checks every field against what FastCDC and the zero detector accept.
    pub fn validate(&self) -> Result<(), ParamsError> {
        use fastcdc::v2020 as f;
        let range = |what, value: u32, lo: usize, hi: usize| {
            if (value as usize) < lo || (value as usize) > hi {
                Err(ParamsError::Range {
                    what,
                    value,
                    lo: lo as u32,
                    hi: hi as u32,
                })
            } else if value % 2 != 0 {
                Err(ParamsError::Odd { what, value })
            } else {
                Ok(())
            }
        };
        range("min", self.min_size, f::MINIMUM_MIN, f::MINIMUM_MAX)?;
        range("avg", self.avg_size, f::AVERAGE_MIN, f::AVERAGE_MAX)?;
        range("max", self.max_size, f::MAXIMUM_MIN, f::MAXIMUM_MAX)?;
        if !(self.min_size < self.avg_size && self.avg_size < self.max_size) {
            return Err(ParamsError::Order {
                min: self.min_size,
                avg: self.avg_size,
                max: self.max_size,
            });
        }
        if self.zero_min == 0 || self.zero_min as u64 % ZERO_BLOCK != 0 {
            return Err(ParamsError::ZeroMin(self.zero_min));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_params_are_valid() {
        ChunkParams::default().validate().unwrap();
    }

    #[test]
    fn nonsense_params_are_refused_with_the_reason() {
        assert!(matches!(
            ChunkParams::new(65536, 16384, 262144),
            Err(ParamsError::Order { .. })
        ));
        assert!(matches!(
            ChunkParams::new(0, 16384, 262144),
            Err(ParamsError::Range { what: "min", .. })
        ));
        assert!(matches!(
            ChunkParams::new(16384, 16385, 262144),
            Err(ParamsError::Odd { what: "avg", .. })
        ));
        let p = ChunkParams {
            zero_min: 1000,
            ..ChunkParams::default()
        };
        assert_eq!(p.validate(), Err(ParamsError::ZeroMin(1000)));
        let msg = ChunkParams::new(65536, 16384, 262144)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("min < avg < max"), "{msg}");
    }
}
