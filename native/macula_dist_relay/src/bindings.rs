//! Name→key bindings of recently seen nodes, kept in the relay's state
//! directory so that a restart does not open every keyed node's name to
//! the first token holder that asks: one line per name, `name key-hex
//! live` (identified when written: held for the full hold time from the
//! restart) or `name key-hex DEADLINE` (unix seconds). Written to a
//! temporary file and renamed over the old one; at most
//! [`macula_relay_proto::relay::router::MAX_HELD`] lines, so bounded in size.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use macula_relay_proto::relay::router::{KeyId, MAX_HELD};

/// A file larger than this is not read (it was not written by a relay).
const MAX_FILE: u64 = 16 << 20;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes `bindings` (`None`: live) to `path`, atomically.
pub(crate) fn save(
    path: &Path,
    bindings: &[(String, KeyId, Option<Duration>)],
) -> std::io::Result<()> {
    let now = unix_now();
    let mut text = String::new();
    for (name, key, left) in bindings.iter().take(MAX_HELD) {
        let when = match left {
            None => "live".to_string(),
            Some(left) => (now + left.as_secs().max(1)).to_string(),
        };
        text.push_str(&format!("{name} {} {when}\n", hex::encode(key)));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads what [`save`] wrote: each name, its key and how long it is still
/// held (`Duration::MAX` for a live one: the router caps it at the hold
/// time). A missing or unreadable file holds nothing; bad lines are skipped.
pub(crate) fn load(path: &Path) -> Vec<(String, KeyId, Duration)> {
    let too_big = std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_FILE);
    if too_big {
        tracing::warn!(path = %path.display(), "name bindings file too large: ignored");
        return vec![];
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return vec![];
    };
    let now = unix_now();
    text.lines()
        .take(MAX_HELD)
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (name, key, when) = (words.next()?, words.next()?, words.next()?);
            let key: KeyId = hex::decode(key).ok()?.try_into().ok()?;
            let left = match when {
                "live" => Duration::MAX,
                deadline => Duration::from_secs(deadline.parse::<u64>().ok()?.checked_sub(now)?),
            };
            (!left.is_zero()).then(|| (name.to_string(), key, left))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_skips_what_is_over_or_bad() {
        let dir = std::env::temp_dir().join(format!("macula-bindings-{}", std::process::id()));
        let path = dir.join("names");
        save(
            &path,
            &[
                ("a@h".into(), [1; 32], None),
                ("b@h".into(), [2; 32], Some(Duration::from_secs(300))),
            ],
        )
        .unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("c@h zz 5\nd@h 0303 live\ne@h ");
        text.push_str(&hex::encode([4u8; 32]));
        text.push_str(" 1\n");
        std::fs::write(&path, text).unwrap();
        let got = load(&path);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], ("a@h".into(), [1; 32], Duration::MAX));
        assert_eq!(got[1].0, "b@h");
        assert!(got[1].2 <= Duration::from_secs(301) && got[1].2 >= Duration::from_secs(290));
        assert!(load(&dir.join("none")).is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
