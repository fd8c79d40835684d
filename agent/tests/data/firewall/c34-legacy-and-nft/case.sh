# CASE: nf_tables accepts tcp/8080 (policy accept) while an iptables-legacy INPUT rule drops it for IPv4: both hooks run, the legacy drop wins; IPv6 has no legacy rule
# PROBE: tcp:22 tcp:8080
set -e
nft -f - <<'N'
table inet filter {
  chain input {
    type filter hook input priority filter; policy accept;
    tcp dport 8080 accept
  }
}
N
iptables-legacy-restore <<'R'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 8080 -j DROP
COMMIT
R
