//! Release tags: `images-YYYY.MM.DD.N`.

use crate::timefmt::days_from_civil;

/// A parsed release tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub serial: u32,
}

impl Tag {
    /// Parses `images-YYYY.MM.DD.N`; the error says what the form is.
    pub fn parse(s: &str) -> Result<Tag, String> {
        let bad = || format!("release tag {s:?} is not of the form images-YYYY.MM.DD.N");
        let rest = s.strip_prefix("images-").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('.').collect();
        let [y, m, d, n] = parts.as_slice() else {
            return Err(bad());
        };
        if y.len() != 4 || m.len() != 2 || d.len() != 2 || n.is_empty() {
            return Err(bad());
        }
        let tag = Tag {
            year: y.parse().map_err(|_| bad())?,
            month: m.parse().map_err(|_| bad())?,
            day: d.parse().map_err(|_| bad())?,
            serial: n.parse().map_err(|_| bad())?,
        };
        if !(1..=12).contains(&tag.month) || !(1..=31).contains(&tag.day) {
            return Err(bad());
        }
        Ok(tag)
    }

    /// Midnight UTC of the tag's date: the default `SOURCE_DATE_EPOCH` of a release build, so
    /// that rebuilding a tag reproduces its timestamps.
    pub fn epoch(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let t = Tag::parse("images-2026.12.01.1").unwrap();
        assert_eq!((t.year, t.month, t.day, t.serial), (2026, 12, 1, 1));
        assert_eq!(t.epoch(), 1_796_083_200);
        for bad in
            ["images-2026.12.1.1", "2026.12.01.1", "images-2026.13.01.1", "images-2026.12.01", "images-2026.12.01.x"]
        {
            assert!(Tag::parse(bad).is_err(), "{bad}");
        }
    }
}
