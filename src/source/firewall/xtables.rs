//! Legacy xtables, read through the real `iptables-legacy-save -c` and
//! `ip6tables-legacy-save -c` (the kernel's `IPT_SO_GET_ENTRIES` blob
//! carries each match's private layout, which only the iptables
//! extensions know). Legacy rules have no handle: a rule is known by its
//! chain and text, so moving a rule keeps its identity, and two identical
//! rules in one chain are told apart by their order.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::process::{Command, Stdio};

use super::nft::comment;
use super::rules::{Backend, DecodeIssue, Issues, Rule, Verdict};

/// The save programs and the family each reads.
pub const SAVE_PROGRAMS: &[(&str, &str)] = &[
    ("iptables-legacy-save", "ip"),
    ("ip6tables-legacy-save", "ip6"),
];

/// Whether the calling thread's network namespace has legacy tables of
/// `family` loaded (`/proc/thread-self/net/ip_tables_names`); reading them
/// otherwise would load the kernel modules.
pub fn tables_loaded(family: &str) -> bool {
    let file = if family == "ip6" {
        "ip6_tables_names"
    } else {
        "ip_tables_names"
    };
    std::fs::read_to_string(Path::new("/proc/thread-self/net").join(file))
        .is_ok_and(|s| !s.trim().is_empty())
}

/// Runs `program -c` (in the calling thread's network namespace) and
/// parses what it prints.
pub fn read(
    program: &Path,
    family: &'static str,
    issues: &mut Issues,
) -> Result<Vec<Rule>, String> {
    let out = Command::new(program)
        .arg("-c")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse(&String::from_utf8_lossy(&out.stdout), family, issues))
}

/// Parses `iptables-save -c` output. Lines that cannot be read are
/// skipped and noted in `issues`.
pub fn parse(text: &str, family: &'static str, issues: &mut Issues) -> Vec<Rule> {
    let mut rules = Vec::new();
    let mut table = String::new();
    let mut positions: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            table = name.to_owned();
            positions.clear();
            continue;
        }
        if let Some(chain) = line.strip_prefix(':') {
            match policy(chain) {
                Some((name, verdict, counters)) => {
                    if let Some(verdict) = verdict {
                        rules.push(rule(family, &table, name, 0, verdict, None, name, counters));
                    }
                }
                None => issues.push(DecodeIssue::Malformed("iptables-save chain line")),
            }
            continue;
        }
        match rule_line(line, issues) {
            Some((chain, spec, verdict, comment, counters)) => {
                let n = positions.entry(chain.to_owned()).or_insert(0);
                *n += 1;
                rules.push(rule(
                    family, &table, chain, *n, verdict, comment, spec, counters,
                ));
            }
            None => issues.push(DecodeIssue::Malformed("iptables-save rule line")),
        }
    }
    rules
}

#[allow(clippy::too_many_arguments)]
fn rule(
    family: &'static str,
    table: &str,
    chain: &str,
    position: u32,
    verdict: Verdict,
    comment: Option<String>,
    spec: &str,
    counters: (u64, u64),
) -> Rule {
    let mut h = DefaultHasher::new();
    spec.hash(&mut h);
    Rule {
        backend: Backend::Xtables,
        family,
        table: table.to_owned(),
        chain: chain.to_owned(),
        position,
        handle: None,
        verdict,
        comment,
        signature: h.finish(),
        counters: Some(counters),
    }
}

/// `[packets:bytes]`.
fn counters(text: &str) -> Option<(u64, u64)> {
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    let (p, b) = inner.split_once(':')?;
    Some((p.parse().ok()?, b.parse().ok()?))
}

/// `NAME POLICY [p:b]`: built-in chains have a policy, user chains `-`.
fn policy(line: &str) -> Option<(&str, Option<Verdict>, (u64, u64))> {
    let mut parts = line.split_whitespace();
    let name = parts.next()?;
    let policy = parts.next()?;
    let c = counters(parts.next()?)?;
    let verdict = (policy != "-").then(|| Verdict::from_target(policy));
    Some((name, verdict, c))
}

type RuleLine<'a> = (&'a str, &'a str, Verdict, Option<String>, (u64, u64));

/// `[p:b] -A CHAIN spec...`.
fn rule_line<'a>(line: &'a str, issues: &mut Issues) -> Option<RuleLine<'a>> {
    let (c, rest) = line.split_once(' ')?;
    let c = counters(c)?;
    let rest = rest.strip_prefix("-A ")?;
    let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
    let words = words(spec)?;
    let mut verdict = Verdict::Continue;
    let mut comment_text = None;
    let mut i = 0;
    while i < words.len() {
        match words[i].as_str() {
            "-j" | "--jump" => {
                let t = words.get(i + 1)?;
                verdict = match Verdict::from_target(t) {
                    Verdict::Other(t) if is_chain_name(&t) => Verdict::Jump(t),
                    v => v,
                };
                i += 1;
            }
            "-g" | "--goto" => {
                verdict = Verdict::Goto(words.get(i + 1)?.clone());
                i += 1;
            }
            "--comment" => {
                // Calico writes two comments on a rule (its `cali:` id and
                // a description): the description is the one kept.
                let text = words.get(i + 1)?;
                if comment_text.is_none() || !text.starts_with("cali:") {
                    comment_text = Some(comment(text, issues));
                }
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    Some((chain, spec, verdict, comment_text, c))
}

/// Extension targets are all upper case (DNAT, MARK, LOG); user chains
/// have lower case or `-` in them (KUBE-SVC-..., cali-...).
fn is_chain_name(target: &str) -> bool {
    target.chars().any(|c| c.is_ascii_lowercase() || c == '-')
}

/// Splits a rule spec into words as iptables-save quotes them: `"..."`
/// with `\"` and `\\` escapes. `None` when a quote is not closed.
fn words(spec: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = spec.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == ' ' {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => word.push(chars.next()?),
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => word.push(c),
                }
            }
            if !closed {
                return None;
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        out.push(word);
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SAVE: &str = r#"# Generated by iptables-save v1.8.9 on Mon Dec  7 04:54:46 2026
*filter
:INPUT ACCEPT [10:600]
:FORWARD DROP [3:180]
:OUTPUT ACCEPT [0:0]
:KUBE-SVC-X - [0:0]
:cali-pi-_abc - [0:0]
[5:300] -A INPUT -p udp -m comment --comment "default/web:http \"quoted\" cluster IP" -j KUBE-SVC-X
[2:120] -A KUBE-SVC-X -j DROP
[1:60] -A KUBE-SVC-X -j DNAT --to-destination 10.0.0.5:80
[7:420] -A cali-pi-_abc -m comment --comment "cali:AbCd" -m comment --comment "Policy default/knp.default.deny ingress" -j DROP
[0:0] -A INPUT -g cali-pi-_abc
COMMIT
"#;

    #[test]
    fn parses_rules_policies_comments_and_verdicts() {
        let mut issues = Vec::new();
        let rules = parse(SAVE, "ip", &mut issues);
        assert!(issues.is_empty(), "{issues:?}");
        let shown: Vec<_> = rules
            .iter()
            .map(|r| {
                (
                    r.chain.as_str(),
                    r.position,
                    r.verdict.clone(),
                    r.comment.as_deref(),
                    r.counters,
                )
            })
            .collect();
        assert_eq!(
            shown,
            vec![
                ("INPUT", 0, Verdict::Accept, None, Some((10, 600))),
                ("FORWARD", 0, Verdict::Drop, None, Some((3, 180))),
                ("OUTPUT", 0, Verdict::Accept, None, Some((0, 0))),
                (
                    "INPUT",
                    1,
                    Verdict::Jump("KUBE-SVC-X".into()),
                    Some("default/web:http \"quoted\" cluster IP"),
                    Some((5, 300))
                ),
                ("KUBE-SVC-X", 1, Verdict::Drop, None, Some((2, 120))),
                (
                    "KUBE-SVC-X",
                    2,
                    Verdict::Other("DNAT".into()),
                    None,
                    Some((1, 60))
                ),
                (
                    "cali-pi-_abc",
                    1,
                    Verdict::Drop,
                    Some("Policy default/knp.default.deny ingress"),
                    Some((7, 420))
                ),
                (
                    "INPUT",
                    2,
                    Verdict::Goto("cali-pi-_abc".into()),
                    None,
                    Some((0, 0))
                ),
            ]
        );
    }

    #[test]
    fn bad_lines_are_counted_and_skipped() {
        let huge = "x".repeat(5000);
        let text = format!(
            "*filter\n:INPUT\n[1:2] -A INPUT -m comment --comment \"{huge}\" -j DROP\n\
             [x:2] -A INPUT -j DROP\n[1:2] -A INPUT -m comment --comment \"open\n\
             garbage\n\u{0}\u{ff}\n[3:4] -A INPUT -j ACCEPT\n"
        );
        let mut issues = Vec::new();
        let rules = parse(&text, "ip", &mut issues);
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].comment.as_ref().map(String::len), Some(256));
        assert_eq!(rules[1].counters, Some((3, 4)));
        let kinds: Vec<_> = issues.iter().map(DecodeIssue::kind).collect();
        assert_eq!(
            kinds,
            vec![
                "malformed",
                "comment_too_long",
                "malformed",
                "malformed",
                "malformed",
                "malformed"
            ]
        );
    }
}
