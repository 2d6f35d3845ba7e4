//! Fuzzes containerd's filter syntax (thinsnap::engine::filter) with arbitrary text.
//!
//! Properties, for any input `s` (bytes made UTF-8 lossily, so every input counts):
//! 1. `Filter::parse(s)` never panics; an error's `pos` is within `s` and on a char boundary.
//! 2. A filter that parses can be matched against fixed snapshots (and one named `s`) without
//!    panicking; `parse_all`/`any_matches` over the lines of `s` never panic either.
//! 3. Round trips, which must hold for every string `s` (within MAX_FILTER_LEN):
//!    - `name==<s quoted>` parses and matches exactly the snapshot named `s`, and
//!      `name!=<s quoted>` exactly the others;
//!    - `labels.<s quoted>==<s quoted>` matches a snapshot with the label `s`=`s`, and one without
//!      it only when `s` is "" (a missing label compares as "");
//!    - `name~=/^<regex::escape(s)>$/` (with `\` and `/` escaped for the /.../ quote) matches
//!      the snapshot named `s` and not one named `s` + "x".
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use thinsnap::engine::filter::{any_matches, parse_all, Fields, Filter, MAX_FILTER_LEN};

/// A `"..."` quoted string that the filter parser must read back as `s`.
fn quote(s: &str, escape_controls: bool) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' if escape_controls => q.push_str("\\n"),
            '\t' if escape_controls => q.push_str("\\t"),
            '\r' if escape_controls => q.push_str("\\r"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// A `/.../` quoted regular expression that the filter parser must read back as `re`.
fn quote_regex(re: &str) -> String {
    let mut q = String::with_capacity(re.len() + 2);
    q.push('/');
    for c in re.chars() {
        match c {
            '/' => q.push_str("\\/"),
            '\\' => q.push_str("\\\\"),
            c => q.push(c),
        }
    }
    q.push('/');
    q
}

struct Snap {
    kind: &'static str,
    name: String,
    parent: String,
    labels: BTreeMap<String, String>,
}

impl Snap {
    fn new(kind: &'static str, name: &str, parent: &str, labels: &[(&str, &str)]) -> Snap {
        Snap {
            kind,
            name: name.to_string(),
            parent: parent.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn fields(&self) -> Fields<'_> {
        Fields {
            kind: self.kind,
            name: &self.name,
            parent: &self.parent,
            labels: &self.labels,
        }
    }
}

fn fixed_snapshots(s: &str) -> Vec<Snap> {
    vec![
        Snap::new("committed", "sha256:abc", "", &[("containerd.io/gc.root", "2024")]),
        Snap::new(
            "active",
            "default/1/ctr",
            "sha256:abc",
            &[("a.b", "1"), ("containerd.io/snapshot.ref", "x")],
        ),
        Snap::new("view", "", "", &[]),
        Snap::new("committed", "ünï\u{0}code\n", "p", &[("", ""), ("l", "ü")]),
        Snap::new("active", s, s, &[(s, s)]),
    ]
}

fn must_parse(filter: &str) -> Filter {
    match Filter::parse(filter) {
        Ok(f) => f,
        Err(e) => panic!("constructed filter {filter:?} was refused: {e}"),
    }
}

fn check_error_pos(input: &str) {
    if let Err(e) = Filter::parse(input) {
        if input.len() <= MAX_FILTER_LEN {
            assert!(
                e.pos <= input.len() && input.is_char_boundary(e.pos),
                "error position {} is not a char boundary of {input:?}: {e}",
                e.pos
            );
        }
    }
}

fn round_trips(s: &str) {
    let named = |name: &str| Snap::new("active", name, "", &[]);
    let other = format!("{s}x");

    for escape_controls in [false, true] {
        let q = quote(s, escape_controls);

        let eq = format!("name=={q}");
        let ne = format!("name!={q}");
        if eq.len() > MAX_FILTER_LEN {
            assert!(Filter::parse(&eq).is_err(), "over-long filter accepted");
            return;
        }
        let (eq_f, ne_f) = (must_parse(&eq), must_parse(&ne));
        assert!(eq_f.matches(&named(s).fields()), "{eq} does not match {s:?}");
        assert!(!eq_f.matches(&named(&other).fields()), "{eq} matches {other:?}");
        assert!(!ne_f.matches(&named(s).fields()), "{ne} matches {s:?}");
        assert!(ne_f.matches(&named(&other).fields()), "{ne} does not match {other:?}");

        // Blanks around the operator and the selector are allowed.
        let spaced = format!("  name ==  {q}  ");
        assert!(must_parse(&spaced).matches(&named(s).fields()), "{spaced} does not match {s:?}");

        let lf = format!("labels.{q}=={q}");
        if lf.len() <= MAX_FILTER_LEN {
            let f = must_parse(&lf);
            let with = Snap::new("active", "n", "", &[(s, s)]);
            let without = Snap::new("active", "n", "", &[(&other, s)]);
            assert!(f.matches(&with.fields()), "{lf} does not match label {s:?}={s:?}");
            // A missing label compares as "" (as in containerd), so only "" matches it.
            assert_eq!(
                f.matches(&without.fields()),
                s.is_empty(),
                "{lf} against a snapshot without label {s:?}"
            );
            // Presence alone.
            assert!(must_parse(&format!("labels.{q}")).matches(&with.fields()));
        }
    }

    let re = format!("name~={}", quote_regex(&format!("^{}$", regex::escape(s))));
    if re.len() <= MAX_FILTER_LEN {
        match Filter::parse(&re) {
            Ok(f) => {
                assert!(f.matches(&named(s).fields()), "{re} does not match {s:?}");
                assert!(!f.matches(&named(&other).fields()), "{re} matches {other:?}");
            }
            // The only acceptable refusal: the escaped literal is too big for the regex limits.
            Err(e) => assert!(
                e.reason.contains("invalid regular expression")
                    && e.reason.contains("size limit"),
                "{re:?} was refused: {e}"
            ),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s: &str = &s;
    let snaps = fixed_snapshots(s);

    // 1 and 2: the input as one filter.
    check_error_pos(s);
    if let Ok(f) = Filter::parse(s) {
        for snap in &snaps {
            let _ = f.matches(&snap.fields());
        }
    }

    // 2: the input as a request's several filters, one a line.
    let lines: Vec<String> = s.lines().map(str::to_string).collect();
    if let Ok(fs) = parse_all(&lines) {
        for snap in &snaps {
            let any = any_matches(&fs, &snap.fields());
            // OR semantics: any_matches is exactly "some filter matches" (or no filters).
            assert_eq!(
                any,
                fs.is_empty() || fs.iter().any(|f| f.matches(&snap.fields()))
            );
        }
    }

    // 3: quoting any string gives a filter that means exactly that string.
    round_trips(s);
});
