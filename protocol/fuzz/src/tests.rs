use std::path::{Path, PathBuf};

use super::*;

fn seed_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target)
}

#[test]
fn seeds_when_fed_to_their_target_then_properties_hold() {
    for (name, check) in TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "no seeds for {name}");
        for s in &seeds {
            check(s);
        }
    }
}

#[test]
fn seeds_when_mutated_byte_by_byte_then_properties_hold() {
    for (name, check) in TARGETS {
        for s in seeds(name) {
            for i in 0..s.len() {
                for v in [0u8, 1, 2, 0x10, 0x80, 0xff] {
                    let mut m = s.clone();
                    m[i] = v;
                    check(&m);
                }
            }
            for len in 0..s.len() {
                check(&s[..len]);
            }
            let mut longer = s.clone();
            longer.push(0);
            check(&longer);
        }
    }
}

/// The committed corpora under `seeds/` are this generator's output;
/// `OUTBOARD_BLESS_SEEDS=1` rewrites them.
#[test]
fn committed_seeds_when_compared_with_generator_then_identical() {
    let bless = std::env::var_os("OUTBOARD_BLESS_SEEDS").is_some();
    for (name, _) in TARGETS {
        let dir = seed_dir(name);
        if bless {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }
        let seeds = seeds(name);
        for (i, s) in seeds.iter().enumerate() {
            let path = dir.join(format!("seed-{i}"));
            if bless {
                std::fs::write(&path, s).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
                panic!("{}: {e} (run with OUTBOARD_BLESS_SEEDS=1)", path.display())
            });
            assert_eq!(
                &on_disk,
                s,
                "{} is stale (run with OUTBOARD_BLESS_SEEDS=1)",
                path.display()
            );
        }
        let files = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .count();
        assert_eq!(files, seeds.len(), "{} has extra files", dir.display());
    }
}

/// An area whose valid slot carries the largest sequence number (found by
/// libFuzzer): committing used to overflow the sequence.
#[test]
fn state_area_when_newest_sequence_is_u64_max_then_no_overflow() {
    let mut area = vec![0u8; outboard_protocol::state::MIN_AREA];
    outboard_protocol::state::open(&mut area).unwrap_or_else(|e| panic!("{e}"));
    outboard_protocol::state::commit(&mut area, b"x").unwrap_or_else(|e| panic!("{e}"));
    area[64..72].copy_from_slice(&u64::MAX.to_ne_bytes());
    state_area(&area);
}
