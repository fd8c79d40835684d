//! Effective exposure: what the namespace's own firewall lets through to each listener.
//!
//! `model` is the ruleset model; `nft_json` and `ipt_save` fill it from what the OS layer
//! read (`os::firewall::RawFirewall`); `eval` answers, purely, whether a new connection
//! from off-host reaches a listener over IPv4 and over IPv6. This module puts the pieces
//! of one namespace together ([`Firewall::from_raw`]) and turns a classified socket into
//! its two questions ([`Firewall::exposure`]). Nothing here does I/O.

pub mod eval;
pub mod ipt_save;
pub mod model;
pub mod nft_json;

use std::net::{IpAddr, Ipv4Addr};

pub use eval::{Answer, Effective};
use eval::{Evaluator, Question};
use model::{Origin, Ruleset, Stmt, TableFamily};

use crate::model::{Classification, LocalAddrs, Protocol, RawSocket, Reach};
use crate::os::firewall::RawFirewall;

/// What the firewall lets through to one listener, per IP version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    pub ipv4: Answer,
    pub ipv6: Answer,
}

impl Exposure {
    /// Both versions unknown for the same reason.
    pub fn unknown(reason: &str) -> Self {
        Exposure {
            ipv4: Answer::new(Effective::Unknown, reason),
            ipv6: Answer::new(Effective::Unknown, reason),
        }
    }
}

/// One namespace's firewall, ready to answer.
#[derive(Debug)]
pub struct Firewall {
    /// Which readers contributed tables (empty: no ruleset at all).
    pub sources: Vec<Origin>,
    /// The nftables generation the ruleset was read at.
    pub generation: Option<u32>,
    /// Set when the ruleset could not be read completely: every verdict is then
    /// `unknown` with this reason (never `open` by default).
    pub unreadable: Option<String>,
    /// Things worth telling the operator that do not stop evaluation.
    pub notes: Vec<String>,
    evaluator: Evaluator,
    /// The namespace's reachable addresses per version (`[v4, v6]`), computed once.
    wildcard: [Option<Vec<IpAddr>>; 2],
}

impl Firewall {
    /// A namespace whose firewall was not read (e.g. read from /proc/PID/net without
    /// CAP_SYS_ADMIN): every verdict is unknown for `reason`.
    pub fn not_read(reason: impl Into<String>) -> Self {
        Firewall {
            sources: Vec::new(),
            generation: None,
            unreadable: Some(reason.into()),
            notes: Vec::new(),
            evaluator: Evaluator::new(&Ruleset::default()),
            wildcard: [None, None],
        }
    }

    /// Parses and merges what the OS layer read: native nftables from nft's JSON, the
    /// rules of tables iptables-nft owns from `iptables-nft-save` (nft's JSON hides their
    /// match parameters), legacy tables from `iptables-legacy-save`.
    pub fn from_raw(raw: &RawFirewall) -> Self {
        let mut unreadable: Vec<String> = crate::os::firewall::describe(&raw.problems);
        let mut notes = Vec::new();
        let mut ruleset = Ruleset::default();
        if let Some(json) = &raw.nft_json {
            match nft_json::parse(json) {
                Ok(mut tables) => {
                    if let Some(text) = &raw.nft_text {
                        ingress_devices(&mut tables, text);
                    }
                    ruleset.tables = tables;
                }
                Err(e) => unreadable.push(format!("the nftables ruleset could not be parsed: {e}")),
            }
        } else if !raw.nft_tables.is_empty() && raw.problems.is_empty() {
            unreadable.push("nftables tables exist but their rules were not read".into());
        }
        for (text, family) in [
            (&raw.iptables_nft, TableFamily::Ip),
            (&raw.ip6tables_nft, TableFamily::Ip6),
        ] {
            let needs = ruleset
                .tables
                .iter()
                .any(|t| t.family == family && has_xt(t));
            let Some(text) = text else {
                if needs {
                    unreadable.push(format!(
                        "the {} tables written by iptables-nft were not read (their rules are \
                         opaque in nft's JSON)",
                        family.as_str()
                    ));
                }
                continue;
            };
            if !needs {
                continue;
            }
            match ipt_save::parse(text, family, Origin::IptablesNft) {
                Ok(saved) => {
                    for table in ruleset
                        .tables
                        .iter_mut()
                        .filter(|t| t.family == family && has_xt(t))
                    {
                        let Some(from) = saved.iter().find(|s| s.name == table.name) else {
                            notes.push(format!(
                                "{} {}: iptables-nft-save does not list this table; its \
                                 iptables matches stay undecided",
                                family.as_str(),
                                table.name
                            ));
                            continue;
                        };
                        table.origin = Origin::IptablesNft;
                        for chain in &mut table.chains {
                            let Some(src) = from.chain(&chain.name) else {
                                continue;
                            };
                            if src.rules.len() != chain.rules.len() {
                                // The ruleset changed between the two reads: keep nft's
                                // view (opaque matches decide nothing) and re-read later.
                                notes.push(format!(
                                    "{} {} {}: the rules changed while being read",
                                    family.as_str(),
                                    table.name,
                                    chain.name
                                ));
                                continue;
                            }
                            // Only rules nft shows with `xt` parts: iptables-nft-save
                            // silently leaves out what it cannot print (an nft-added
                            // `ip saddr @s drop` prints as `-A INPUT -j DROP`), so a rule nft
                            // decoded fully keeps nft's version.
                            for (rule, saved) in chain.rules.iter_mut().zip(&src.rules) {
                                if rule_has_xt(rule) {
                                    rule.stmts = saved.stmts.clone();
                                    rule.text = saved.text.clone();
                                }
                            }
                        }
                    }
                }
                Err(e) => unreadable.push(format!(
                    "the {} iptables-nft rules could not be parsed: {e}",
                    family.as_str()
                )),
            }
        }
        for (text, family, names) in [
            (&raw.iptables_legacy, TableFamily::Ip, &raw.legacy_v4_tables),
            (
                &raw.ip6tables_legacy,
                TableFamily::Ip6,
                &raw.legacy_v6_tables,
            ),
        ] {
            match text {
                Some(text) => match ipt_save::parse(text, family, Origin::IptablesLegacy) {
                    Ok(tables) => ruleset.tables.extend(tables),
                    Err(e) => unreadable.push(format!(
                        "the {} iptables-legacy rules could not be parsed: {e}",
                        family.as_str()
                    )),
                },
                None if !names.is_empty() && raw.problems.is_empty() => unreadable.push(format!(
                    "legacy {} tables ({}) exist but were not read",
                    family.as_str(),
                    names.join(", ")
                )),
                None => {}
            }
        }
        let mut sources: Vec<Origin> = ruleset.tables.iter().map(|t| t.origin).collect();
        sources.sort_by_key(|o| o.as_str());
        sources.dedup();
        unreadable.dedup();
        Firewall {
            sources,
            generation: raw.generation,
            unreadable: (!unreadable.is_empty()).then(|| unreadable.join("; ")),
            notes,
            evaluator: Evaluator::new(&ruleset),
            wildcard: [None, None],
        }
    }

    /// The namespace's main-table routes (destination, prefix length, interface): where
    /// a DNAT target's traffic leaves, for the forward path of a diverted port.
    pub fn set_routes(&mut self, routes: Vec<(IpAddr, u8, String)>) {
        self.evaluator.set_routes(routes);
    }

    /// The namespace's local addresses: a DNAT to one of them stays on the host.
    pub fn set_local(&mut self, local: &LocalAddrs) {
        self.evaluator.set_local(local.clone());
    }

    /// The effective exposure of one classified socket. `ipv6` is the namespace's IPv6
    /// state: where its interfaces take no IPv6, that (not the socket) is why IPv6 is `n/a`.
    pub fn exposure(
        &mut self,
        socket: &RawSocket,
        class: &Classification,
        local: Option<&LocalAddrs>,
        ipv6: Option<&crate::model::Ipv6Facts>,
    ) -> Exposure {
        let ipv6_answer = match ipv6 {
            Some(facts)
                if facts.state != crate::model::Ipv6State::Enabled
                    && matches!(class.reach_ipv6, Reach::None | Reach::Loopback)
                    && socket.family == crate::model::Family::Ipv6 =>
            {
                Answer::new(
                    Effective::NotApplicable,
                    format!(
                        "IPv6 is {} in this namespace: {}",
                        match facts.state {
                            crate::model::Ipv6State::LoopbackOnly => "on loopback only",
                            crate::model::Ipv6State::Unavailable => "not in the kernel",
                            _ => "disabled",
                        },
                        facts.reason.as_deref().unwrap_or("see namespaces[].ipv6")
                    ),
                )
            }
            _ => self.one(socket, class, local, true),
        };
        Exposure {
            ipv4: self.one(socket, class, local, false),
            ipv6: ipv6_answer,
        }
    }

    fn one(
        &mut self,
        socket: &RawSocket,
        class: &Classification,
        local: Option<&LocalAddrs>,
        v6: bool,
    ) -> Answer {
        let version = if v6 { "IPv6" } else { "IPv4" };
        let na = |why: String| Answer::new(Effective::NotApplicable, why);
        if class.latent {
            return na("the bound address is not local: the socket accepts nothing yet".into());
        }
        let reach = if v6 {
            class.reach_ipv6
        } else {
            class.reach_ipv4
        };
        let daddrs: Vec<IpAddr> = match reach {
            Reach::None => return na(format!("the socket accepts no {version}")),
            Reach::Loopback => return na(format!("the socket accepts {version} on loopback only")),
            Reach::Unknown => {
                return Answer::new(
                    Effective::Unknown,
                    format!("the socket's {version} reach is unknown"),
                );
            }
            Reach::Specific => match (socket.address, v6) {
                (IpAddr::V4(a), false) => vec![IpAddr::V4(a)],
                (IpAddr::V6(a), false) => match a.to_ipv4_mapped() {
                    Some(m) => vec![IpAddr::V4(m)],
                    None => return na(format!("the socket accepts no {version}")),
                },
                (IpAddr::V6(a), true) => vec![IpAddr::V6(a)],
                (IpAddr::V4(_), true) => return na(format!("the socket accepts no {version}")),
            },
            Reach::Any => match local {
                Some(local) => self.wildcard[usize::from(v6)]
                    .get_or_insert_with(|| reachable_addresses(local, v6))
                    .clone(),
                None => {
                    return Answer::new(
                        Effective::Unknown,
                        "the namespace's local addresses could not be read",
                    );
                }
            },
        };
        if daddrs.is_empty() {
            return na(format!(
                "the namespace has no {version} address other than loopback and link-local"
            ));
        }
        if let Some(why) = &self.unreadable {
            return Answer::new(Effective::Unknown, why.clone());
        }
        if self.evaluator.is_empty() {
            return Answer::new(Effective::Open, "no firewall rules in this namespace");
        }
        self.evaluator.answer(&Question {
            tcp: socket.protocol == Protocol::Tcp,
            port: socket.port,
            v6,
            daddrs,
        })
    }
}

/// Fills in the devices of ingress chains from `nft list ruleset` text (nft 1.0.6's JSON
/// leaves them out): `type filter hook ingress device "eth1" priority …` or
/// `devices = { ct0, eth1 }`.
pub fn ingress_devices(tables: &mut [model::Table], text: &str) {
    let (mut table, mut chain): (Option<(String, String)>, Option<String>) = (None, None);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", family, name, "{", ..] => {
                table = Some(((*family).to_owned(), (*name).to_owned()));
            }
            ["chain", name, "{", ..] => chain = Some((*name).to_owned()),
            _ if line.starts_with("type ") && line.contains(" hook ingress ") => {
                let devices: Option<Vec<String>> =
                    if let Some(rest) = line.split(" devices = {").nth(1) {
                        rest.split('}').next().map(|list| {
                            list.split(',')
                                .map(|d| d.trim().trim_matches('"').to_owned())
                                .filter(|d| !d.is_empty())
                                .collect()
                        })
                    } else {
                        line.split(" device ")
                            .nth(1)
                            .and_then(|rest| rest.split_whitespace().next())
                            .map(|d| vec![d.trim_matches('"').to_owned()])
                    };
                let (Some((family, tname)), Some(cname), Some(devices)) = (&table, &chain, devices)
                else {
                    continue;
                };
                for t in tables
                    .iter_mut()
                    .filter(|t| t.family.as_str() == family && &t.name == tname)
                {
                    for c in t.chains.iter_mut().filter(|c| &c.name == cname) {
                        if let Some(b) = &mut c.base
                            && b.devices.is_none()
                        {
                            b.devices = Some(devices.clone());
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

fn has_xt(t: &model::Table) -> bool {
    t.chains.iter().any(|c| c.rules.iter().any(rule_has_xt))
}

fn rule_has_xt(r: &model::Rule) -> bool {
    r.stmts
        .iter()
        .any(|s| matches!(s, Stmt::Opaque { text } if text.starts_with("xt ")))
}

/// The addresses an off-host client can reach a wildcard socket on: the namespace's local
/// addresses without loopback, link-local (not routable off the link) and multicast.
/// AnyIP prefixes stand for their first address.
pub fn reachable_addresses(local: &LocalAddrs, v6: bool) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = if v6 {
        local
            .v6
            .iter()
            .map(|&(a, _, _)| a)
            .filter(|a| {
                !a.is_loopback()
                    && !a.is_unicast_link_local()
                    && !a.is_multicast()
                    && !a.is_unspecified()
                    && a.to_ipv4_mapped().is_none()
            })
            .map(IpAddr::V6)
            .collect()
    } else {
        local
            .v4
            .iter()
            .map(|&(a, _)| a)
            .filter(|a: &Ipv4Addr| {
                !a.is_loopback() && !a.is_link_local() && !a.is_multicast() && !a.is_unspecified()
            })
            .map(IpAddr::V4)
            .collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn fixture(case: &str, file: &str) -> Option<String> {
        std::fs::read_to_string(format!(
            "{}/tests/data/firewall/{case}/{file}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .ok()
    }

    /// What the OS layer would have read in the fixture's namespace.
    fn raw(case: &str) -> RawFirewall {
        let nft_json = fixture(case, "captured.json");
        let (mut v4, mut v6) = (None, None);
        if let Some(saved) = fixture(case, "captured.iptables-nft.txt") {
            let at = saved
                .find("# Generated by ip6tables")
                .unwrap_or(saved.len());
            v4 = Some(saved[..at].to_owned());
            v6 = Some(saved[at..].to_owned()).filter(|s| !s.is_empty());
        }
        RawFirewall {
            generation: Some(1),
            nft_tables: vec![("inet".into(), "x".into())],
            nft_json,
            iptables_nft: v4,
            ip6tables_nft: v6,
            ..RawFirewall::default()
        }
    }

    fn verdicts(fw: &mut Firewall, tcp: bool, port: u16) -> (Answer, Answer) {
        let q = |v6: bool| Question {
            tcp,
            port,
            v6,
            daddrs: if v6 {
                vec![
                    "2001:db8:100::10".parse().unwrap(),
                    "2001:db8:200::10".parse().unwrap(),
                ]
            } else {
                vec![
                    "198.51.100.10".parse().unwrap(),
                    "203.0.113.10".parse().unwrap(),
                ]
            },
        };
        (
            fw.evaluator.answer(&q(false)),
            fw.evaluator.answer(&q(true)),
        )
    }

    fn short(a: &Answer) -> String {
        match a.conditions.as_slice() {
            [] => a.verdict.as_str().to_owned(),
            c => format!("{}[{}]", a.verdict.as_str(), c.join(" | ")),
        }
    }

    /// ufw and Docker write their rules with iptables-nft: nft's JSON hides the match
    /// parameters, `iptables-nft-save` has them. Verdicts as the real packets had them
    /// (tests/data/firewall/*/observed.txt).
    #[test]
    fn iptables_nft_rulesets_decided_with_the_saved_rules() {
        let mut ufw = Firewall::from_raw(&raw("c14-ufw"));
        assert_eq!(ufw.unreadable, None);
        assert_eq!(ufw.sources, vec![Origin::IptablesNft]);
        for (tcp, port, expected) in [
            (true, 22, "open / open"),
            (true, 80, "filtered / filtered"),
            (true, 5432, "restricted[saddr 198.51.100.0/24] / filtered"),
            (false, 68, "restricted[sport 67] / filtered"),
            (false, 5353, "filtered / filtered"),
        ] {
            let (v4, v6) = verdicts(&mut ufw, tcp, port);
            assert_eq!(
                format!("{} / {}", short(&v4), short(&v6)),
                expected,
                "{port}: {v4:?} {v6:?}"
            );
        }
        let (v4, _) = verdicts(&mut ufw, true, 80);
        assert!(v4.reason.starts_with("ufw: "), "{}", v4.reason);

        let mut docker = Firewall::from_raw(&raw("c15-docker-published"));
        assert_eq!(docker.unreadable, None);
        docker.set_routes(vec![("192.0.2.0".parse().unwrap(), 24, "ct0".to_owned())]);
        for (port, expected) in [
            (22, "open / open"),
            (80, "filtered / filtered"),
            (8080, "diverted[iifname != ct0] / filtered"),
        ] {
            let (v4, v6) = verdicts(&mut docker, true, port);
            assert_eq!(
                format!("{} / {}", short(&v4), short(&v6)),
                expected,
                "{port}: {v4:?} {v6:?}"
            );
        }
        let (v4, _) = verdicts(&mut docker, true, 8080);
        assert_eq!(v4.diverted_to.as_deref(), Some("192.0.2.2:80"));
        assert!(
            v4.reason.starts_with("Docker: ip nat DOCKER"),
            "{}",
            v4.reason
        );
    }

    /// Without the saved rules, the opaque iptables matches never yield `open`.
    #[test]
    fn missing_iptables_nft_text_makes_verdicts_unknown() {
        let mut r = raw("c14-ufw");
        r.iptables_nft = None;
        let fw = Firewall::from_raw(&r);
        assert!(fw.unreadable.as_deref().unwrap().contains("iptables-nft"));
    }

    /// Docker publishes 8080 → 192.0.2.2:80 on bridge ct0. DOCKER-USER with `-i eth0`
    /// restricts who reaches the container through eth0; without `-i` the same rule also
    /// drops the container's replies (their source is the container), so nobody gets
    /// through — as real packets showed.
    #[test]
    fn docker_user_with_and_without_input_interface() {
        let saved = fixture("c15-docker-published", "captured.iptables-nft.txt").unwrap();
        let v4 = &saved[..saved.find("# Generated by ip6tables").unwrap()];
        let routes = vec![
            ("192.0.2.0".parse().unwrap(), 24, "ct0".to_owned()),
            ("198.51.100.0".parse().unwrap(), 24, "eth0".to_owned()),
            ("203.0.113.0".parse().unwrap(), 24, "eth1".to_owned()),
        ];
        let run = |user_rule: &str| {
            let text = v4.replace(
                "-A DOCKER-USER -j RETURN",
                &format!("{user_rule}\n-A DOCKER-USER -j RETURN"),
            );
            let tables = ipt_save::parse(&text, TableFamily::Ip, Origin::IptablesNft).unwrap();
            let mut ev = Evaluator::new(&Ruleset { tables });
            ev.set_routes(routes.clone());
            ev.answer(&Question {
                tcp: true,
                port: 8080,
                v6: false,
                daddrs: vec![
                    "198.51.100.10".parse().unwrap(),
                    "203.0.113.10".parse().unwrap(),
                ],
            })
        };
        // From the bridge itself (other containers) the DNAT does not apply and INPUT
        // drops it; from everywhere else it goes to the container.
        let plain = run("");
        assert_eq!(plain.verdict, Effective::Diverted, "{plain:?}");
        assert_eq!(plain.conditions, vec!["iifname != ct0"], "{plain:?}");
        let with_i = run("-A DOCKER-USER -i eth0 ! -s 198.51.100.0/24 -j DROP");
        assert_eq!(with_i.verdict, Effective::Diverted, "{with_i:?}");
        assert_eq!(
            with_i.conditions,
            vec![
                "iifname != ct0 and iifname != eth0",
                "iifname eth0 and saddr 198.51.100.0/24"
            ],
            "{with_i:?}"
        );
        let without_i = run("-A DOCKER-USER ! -s 198.51.100.0/24 -j DROP");
        assert_eq!(without_i.verdict, Effective::Filtered, "{without_i:?}");
        assert!(
            without_i
                .reason
                .contains("the reply is dropped by Docker (DOCKER-USER"),
            "{}",
            without_i.reason
        );
    }

    #[test]
    fn debian_default_and_empty_rulesets_are_open() {
        let json = r#"{"nftables":[{"table":{"family":"inet","name":"filter"}},
          {"chain":{"family":"inet","table":"filter","name":"input","type":"filter","hook":"input","prio":0,"policy":"accept"}},
          {"chain":{"family":"inet","table":"filter","name":"forward","type":"filter","hook":"forward","prio":0,"policy":"accept"}},
          {"chain":{"family":"inet","table":"filter","name":"output","type":"filter","hook":"output","prio":0,"policy":"accept"}}]}"#;
        let mut fw = Firewall::from_raw(&RawFirewall {
            nft_json: Some(json.into()),
            ..RawFirewall::default()
        });
        let (v4, _) = verdicts(&mut fw, true, 80);
        assert_eq!(v4.verdict, Effective::Open);
        assert!(v4.reason.contains("Debian"), "{}", v4.reason);
        assert!(
            Firewall::from_raw(&RawFirewall::default())
                .evaluator
                .is_empty()
        );
    }
}
