//! Byte sizes written as `"256MiB"` / `"2GiB"` in specs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const MIB: u64 = 1024 * 1024;

/// A size in bytes that is a whole number of MiB (partitions are MiB-aligned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(u64);

impl Size {
    pub const fn mib(n: u64) -> Self {
        Size(n * MIB)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
    pub fn as_mib(self) -> u64 {
        self.0 / MIB
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parsed: bytesize::ByteSize = s
            .trim()
            .parse()
            .map_err(|_| format!("invalid size {s:?}: write a number with a unit, such as \"256MiB\" or \"2GiB\""))?;
        let bytes = parsed.as_u64();
        if s.trim().chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("invalid size {s:?}: a unit is required, such as \"{s}MiB\""));
        }
        if bytes == 0 || !bytes.is_multiple_of(MIB) {
            return Err(format!(
                "invalid size {s:?}: must be a positive whole number of MiB (partitions are MiB-aligned)"
            ));
        }
        Ok(Size(bytes))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = self.as_mib();
        if mib.is_multiple_of(1024) {
            write!(f, "{}GiB", mib / 1024)
        } else {
            write!(f, "{mib}MiB")
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl schemars::JsonSchema for Size {
    fn schema_name() -> String {
        "Size".into()
    }
    fn json_schema(gen: &mut schemars::gen::SchemaGenerator) -> schemars::schema::Schema {
        String::json_schema(gen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("256MiB", 256)]
    #[case("2GiB", 2048)]
    #[case("1 GiB", 1024)]
    fn parses_mib_multiples(#[case] input: &str, #[case] mib: u64) {
        assert_eq!(input.parse::<Size>().unwrap().as_mib(), mib);
    }

    #[rstest]
    #[case("0MiB", "positive whole number")]
    #[case("1000", "unit is required")]
    #[case("1.5MiB", "whole number of MiB")]
    #[case("lots", "invalid size")]
    #[case("-1GiB", "invalid size")]
    fn rejects_impossible_sizes(#[case] input: &str, #[case] why: &str) {
        let err = input.parse::<Size>().unwrap_err();
        assert!(err.contains(why), "{err}");
    }

    #[test]
    fn displays_round_trip() {
        for s in ["64MiB", "3GiB", "1536MiB"] {
            assert_eq!(s.parse::<Size>().unwrap().to_string(), s);
        }
    }
}
