//! Sizes on the command line, as qemu-img reads them: a bare number is
//! bytes, and K, M, G, T, P (optionally followed by "iB" or "B") are powers of
//! 1024, so `10G` means 10 GiB, as it does for qemu-img.

/// Parses a size such as `64K`, `1M`, `1.5G`, `4096`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => return Err(format!("unknown size unit in {text:?} (use K, M, G, T, P)")),
    };
    let too_large = || format!("{text:?} is too large (at most 16 EiB - 1 byte)");
    if !number.contains('.') {
        // Whole numbers exactly: a float would round 2^64 down to fit.
        let whole: u64 = match number.parse() {
            Ok(n) => n,
            Err(_) if !number.is_empty() => return Err(too_large()),
            Err(_) => return Err(format!("{text:?} is not a size")),
        };
        return whole.checked_mul(1u64 << shift).ok_or_else(too_large);
    }
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let bytes = number * (1u64 << shift) as f64;
    // 2^64 as a float: anything at or above it does not fit.
    if bytes >= 18_446_744_073_709_551_616.0 {
        return Err(too_large());
    }
    if !bytes.is_finite() || bytes < 0.0 || bytes.fract() != 0.0 {
        return Err(format!("{text:?} is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

/// Formats bytes for people: binary units, one decimal.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_qemu_img() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2MB"), Ok(2 << 20));
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for over in [
            "18446744073709551616",
            "99999999999999999999999",
            "16384P",
            "16384.0P",
        ] {
            let refused = parse_size(over).unwrap_err();
            assert!(refused.contains("too large"), "{over}: {refused}");
        }
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10), "10 B");
    }
}
