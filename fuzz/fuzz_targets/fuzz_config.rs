//! Fuzzes the TOML configuration parser (thinsnap::config::Config::parse) with arbitrary text.
//!
//! Properties, for any UTF-8 input:
//! 1. `Config::parse` never panics, whatever it returns.
//! 2. A config that parses re-serializes with `toml::to_string`, and that text parses again
//!    (validation included) to an equal `Config`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thinsnap::config::Config;

fuzz_target!(|data: &[u8]| {
    // Config files are read with read_to_string, so non-UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text) else {
        return;
    };
    let ser = match toml::to_string(&config) {
        Ok(ser) => ser,
        Err(e) => panic!("parsed config {config:?} does not serialize: {e}"),
    };
    let again = match Config::parse(&ser) {
        Ok(again) => again,
        Err(e) => panic!(
            "re-serialized config does not parse again: {e}\n--- input ---\n{text}\n--- serialized ---\n{ser}"
        ),
    };
    assert_eq!(
        config, again,
        "re-serialized config differs\n--- input ---\n{text}\n--- serialized ---\n{ser}"
    );
});
