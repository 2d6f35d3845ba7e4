//! Replays the inputs the fuzzers found (fuzz/regressions/) through the same properties, on
//! every `cargo test`: each of them once broke a parser, and must keep passing without libFuzzer.

use std::path::Path;

use thinsnap::config::Config;
use thinsnap::engine::filter::{parse_all, Filter, MAX_REGEXES};

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("entry").path();
            let bytes = std::fs::read(&p).expect("read");
            (p.display().to_string(), bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no regression inputs in {}", dir.display());
    out
}

#[test]
fn config_regressions_parse_and_round_trip_exactly() {
    for (name, bytes) in inputs("fuzz_config") {
        let text = String::from_utf8(bytes).expect("utf-8");
        let Ok(config) = Config::parse(&text) else {
            continue;
        };
        let ser = toml::to_string(&config).unwrap_or_else(|e| panic!("{name}: serialize: {e}"));
        let again = Config::parse(&ser).unwrap_or_else(|e| panic!("{name}: reparse: {e}\n{ser}"));
        assert_eq!(config, again, "{name}: round trip changed the config");
    }
}

#[test]
fn filter_regressions_are_refused_cheaply_or_parsed() {
    for (name, bytes) in inputs("fuzz_filter") {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let regexes = text.matches("~=").count();
        match parse_all(&lines) {
            Ok(filters) => {
                assert!(regexes <= MAX_REGEXES, "{name}: {regexes} regexes accepted");
                assert_eq!(filters.len(), lines.len());
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty(), "{name}: empty error");
            }
        }
        // One filter alone never panics either.
        let _ = Filter::parse(&text);
    }
}
