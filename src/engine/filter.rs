//! containerd's filter syntax for List (Walk), as its `filters` package defines it:
//!
//! ```text
//! filter    := selector ("," selector)*          every selector must match (AND)
//! selector  := fieldpath [op value]               a bare fieldpath tests presence
//! fieldpath := field ("." field)*
//! field     := identifier | quoted
//! op        := "==" | "!=" | "~="                 ~= is a regular expression match
//! value     := quoted | run of characters up to "," or end
//! quoted    := "..." (with \" \\ \n \t escapes) | /.../ (for regular expressions)
//! ```
//!
//! A request carries several filters; a snapshot is listed if any one matches (OR). Snapshot
//! fields: `kind`, `name`, `parent`, `labels.<key>`. Nothing here touches the store.

use std::collections::BTreeMap;

use regex::Regex;

/// A parse error, with the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid filter {input:?} at byte {pos}: {reason}")]
pub struct FilterError {
    pub input: String,
    pub pos: usize,
    pub reason: String,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Match(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// One parsed filter: a conjunction of selectors.
#[derive(Debug, Clone)]
pub struct Filter {
    selectors: Vec<Selector>,
}

/// The fields of a snapshot a filter can see.
pub struct Fields<'a> {
    pub kind: &'a str,
    pub name: &'a str,
    pub parent: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// Limits against hostile input: a filter longer than this is refused before parsing.
pub const MAX_FILTER_LEN: usize = 16 * 1024;

struct Parser<'a> {
    input: &'a str,
    pos: usize,
    /// Regular expressions this request may still compile (see [`MAX_REGEXES`]).
    regexes_left: &'a mut usize,
}

impl<'a> Parser<'a> {
    fn err(&self, reason: impl Into<String>) -> FilterError {
        FilterError {
            input: self.input.to_string(),
            pos: self.pos,
            reason: reason.into(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.input.len() - trimmed.len();
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn eat(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    fn quoted(&mut self, quote: char) -> Result<String, FilterError> {
        let start = self.pos;
        self.pos += quote.len_utf8();
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.pos += i + c.len_utf8();
                    return Ok(out);
                }
                '\\' => {
                    let Some((_, e)) = chars.next() else { break };
                    match e {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        '\\' => out.push('\\'),
                        '"' => out.push('"'),
                        '/' if quote == '/' => out.push('/'),
                        // In a regular expression other escapes belong to the regex.
                        e if quote == '/' => {
                            out.push('\\');
                            out.push(e);
                        }
                        e => {
                            self.pos += i;
                            return Err(self.err(format!("unknown escape \\{e}")));
                        }
                    }
                }
                c => out.push(c),
            }
        }
        self.pos = start;
        Err(self.err("unterminated quoted string"))
    }

    fn field(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let len = self
                    .rest()
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(self.rest().len());
                let f = self.rest()[..len].to_string();
                self.pos += len;
                Ok(f)
            }
            Some(c) => Err(self.err(format!("expected a field name, found {c:?}"))),
            None => Err(self.err("expected a field name, found the end")),
        }
    }

    fn value(&mut self) -> Result<String, FilterError> {
        self.skip_ws();
        match self.peek() {
            Some(q @ ('"' | '/')) => self.quoted(q),
            _ => {
                let len = self.rest().find(',').unwrap_or(self.rest().len());
                let v = self.rest()[..len].trim_end().to_string();
                if v.is_empty() {
                    return Err(self.err("expected a value"));
                }
                if let Some(bad) = v.chars().find(|c| "\"=!~".contains(*c)) {
                    return Err(self.err(format!("unexpected {bad:?} in value; quote it")));
                }
                self.pos += len;
                Ok(v)
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        self.skip_ws();
        let mut path = vec![self.field()?];
        while self.eat(".") {
            path.push(self.field()?);
        }
        self.skip_ws();
        let op = if self.eat("==") {
            Op::Eq(self.value()?)
        } else if self.eat("!=") {
            Op::Ne(self.value()?)
        } else if self.eat("~=") {
            let at = self.pos;
            let v = self.value()?;
            // Counted before compiling: the limit must bound the work, not just the result.
            if *self.regexes_left == 0 {
                return Err(self.err(format!(
                    "too many regular expressions: at most {MAX_REGEXES} per request"
                )));
            }
            *self.regexes_left -= 1;
            // Bounded: a short Unicode-class repetition can otherwise cost megabytes and tens of
            // milliseconds to compile (found by fuzz_filter), many times over in one request.
            let re = regex::RegexBuilder::new(&v)
                .size_limit(1 << 20)
                .dfa_size_limit(1 << 20)
                .build()
                .map_err(|e| FilterError {
                    input: self.input.to_string(),
                    pos: at,
                    reason: format!("invalid regular expression: {e}"),
                })?;
            Op::Match(re)
        } else {
            Op::Present
        };
        self.skip_ws();
        Ok(Selector { path, op })
    }
}

impl Filter {
    /// Parses one filter string. An empty (or all-blank) string matches everything.
    ///
    /// Returns an error naming the position of the first syntax error.
    pub fn parse(input: &str) -> Result<Filter, FilterError> {
        let mut regexes_left = MAX_REGEXES;
        Filter::parse_counted(input, &mut regexes_left)
    }

    /// [`Filter::parse`], compiling at most `regexes_left` regular expressions (decremented).
    fn parse_counted(input: &str, regexes_left: &mut usize) -> Result<Filter, FilterError> {
        if input.len() > MAX_FILTER_LEN {
            return Err(FilterError {
                input: format!("{}...", input.chars().take(64).collect::<String>()),
                pos: MAX_FILTER_LEN,
                reason: format!("longer than {MAX_FILTER_LEN} bytes"),
            });
        }
        let mut p = Parser {
            input,
            pos: 0,
            regexes_left,
        };
        let mut selectors = Vec::new();
        p.skip_ws();
        if p.peek().is_none() {
            return Ok(Filter { selectors });
        }
        loop {
            selectors.push(p.selector()?);
            match p.peek() {
                None => break,
                Some(',') => p.pos += 1,
                Some(c) => return Err(p.err(format!("expected ',' or the end, found {c:?}"))),
            }
        }
        Ok(Filter { selectors })
    }

    /// Whether every selector matches `f`.
    pub fn matches(&self, f: &Fields<'_>) -> bool {
        self.selectors.iter().all(|s| {
            let value: Option<&str> = match s.path.as_slice() {
                [k] if k == "kind" => Some(f.kind),
                [k] if k == "name" => Some(f.name),
                [k] if k == "parent" => Some(f.parent).filter(|p| !p.is_empty()),
                [k, rest @ ..] if k == "labels" && !rest.is_empty() => {
                    f.labels.get(&rest.join(".")).map(String::as_str)
                }
                _ => None,
            };
            match (&s.op, value) {
                (Op::Present, v) => v.is_some(),
                (Op::Eq(want), v) => v.unwrap_or("") == want,
                (Op::Ne(want), v) => v.unwrap_or("") != want,
                (Op::Match(re), Some(v)) => re.is_match(v),
                (Op::Match(_), None) => false,
            }
        })
    }
}

/// Most filters one List request may carry (containerd and its clients send one or a few; each
/// is at most [`MAX_FILTER_LEN`] bytes and every snapshot is checked against each).
pub const MAX_FILTERS: usize = 64;

/// Most regular expressions (`~=`) one request may carry, across all its filters.
pub const MAX_REGEXES: usize = 16;

/// Parses every filter of a request.
///
/// Returns the first parse error, or an error if the request carries more than
/// [`MAX_REGEXES`] regular expressions.
pub fn parse_all(filters: &[String]) -> Result<Vec<Filter>, FilterError> {
    let mut regexes_left = MAX_REGEXES;
    filters
        .iter()
        .map(|f| Filter::parse_counted(f, &mut regexes_left))
        .collect()
}

/// Whether `f` passes a request's filters: any of them (OR); no filters pass everything.
pub fn any_matches(filters: &[Filter], f: &Fields<'_>) -> bool {
    filters.is_empty() || filters.iter().any(|flt| flt.matches(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn check(filter: &str, kind: &str, name: &str, parent: &str, l: &[(&str, &str)]) -> bool {
        let labels = labels(l);
        Filter::parse(filter)
            .unwrap_or_else(|e| panic!("{filter}: {e}"))
            .matches(&Fields {
                kind,
                name,
                parent,
                labels: &labels,
            })
    }

    #[test]
    fn containerd_examples() {
        assert!(check("kind==committed", "committed", "a", "", &[]));
        assert!(!check("kind==committed", "active", "a", "", &[]));
        assert!(check("name==x", "active", "x", "", &[]));
        assert!(check(r#"parent!="""#, "active", "x", "p", &[]));
        assert!(!check(r#"parent!="""#, "active", "x", "", &[]));
        assert!(check("parent", "active", "x", "p", &[]));
        assert!(!check("parent", "active", "x", "", &[]));
        let gc = [("containerd.io/gc.root", "y")];
        assert!(check(
            r#"labels."containerd.io/gc.root"==y"#,
            "committed",
            "a",
            "",
            &gc
        ));
        assert!(!check(
            r#"labels."containerd.io/gc.root"==n"#,
            "committed",
            "a",
            "",
            &gc
        ));
        assert!(check(
            r#"labels."containerd.io/gc.root""#,
            "committed",
            "a",
            "",
            &gc
        ));
        assert!(check("labels.l", "active", "a", "", &[("l", "")]));
        assert!(!check("labels.l", "active", "a", "", &[]));
        assert!(check("kind==active, name==a", "active", "a", "", &[]));
        assert!(!check("kind==active,name==b", "active", "a", "", &[]));
        assert!(check("name~=^a.c$", "active", "abc", "", &[]));
        assert!(check(r#"name~=/^a\.c$/"#, "active", "a.c", "", &[]));
        assert!(!check(r#"name~=/^a\.c$/"#, "active", "abc", "", &[]));
        assert!(check("labels.a.b==1", "active", "x", "", &[("a.b", "1")]));
        assert!(check("", "active", "x", "", &[]));
        assert!(check(
            r#"name=="with \"quote\"""#,
            "active",
            r#"with "quote""#,
            "",
            &[]
        ));
    }

    #[test]
    fn several_filters_are_or() {
        let fs = parse_all(&["name==a".into(), "name==b".into()]).expect("parse");
        let l = BTreeMap::new();
        let f = |name| Fields {
            kind: "active",
            name,
            parent: "",
            labels: &l,
        };
        assert!(any_matches(&fs, &f("a")));
        assert!(any_matches(&fs, &f("b")));
        assert!(!any_matches(&fs, &f("c")));
        assert!(any_matches(&[], &f("c")));
    }

    #[test]
    fn malformed_filters_are_errors() {
        for bad in [
            "==x",
            "name==",
            "name==\"open",
            "name=x",
            "name==a b==c",
            "labels.",
            ",",
            "name~=(",
            "name==a,",
            "9abc==1",
            "name==\"\\q\"",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = "a".repeat(MAX_FILTER_LEN + 1);
        assert!(Filter::parse(&long).is_err());
        // A regex whose compiled form would be huge is refused, not built.
        assert!(Filter::parse(r"name~=\w{200}").is_err());
        let many: Vec<String> = (0..=MAX_REGEXES).map(|i| format!("name~=a{i}")).collect();
        let err = parse_all(&many).expect_err("17 regexes in 17 filters");
        assert!(err.to_string().contains("at most 16"), "{err}");
        let one: Vec<String> = (0..MAX_REGEXES).map(|i| format!("name~=a{i}")).collect();
        assert_eq!(parse_all(&one).expect("16 are allowed").len(), MAX_REGEXES);
        // In one filter too, refused at the 17th, before compiling it or anything after it.
        let joined = (0..1000)
            .map(|i| format!("name~=a{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let err = Filter::parse(&joined).expect_err("1000 regexes in one filter");
        assert!(err.to_string().contains("at most 16"), "{err}");
    }
}
