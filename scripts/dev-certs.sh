#!/usr/bin/env bash
# Development certificates for cleave's mutual TLS: a CA and one certificate per role, signed by
# it. Not for production (the CA key sits beside the certificates; use your PKI there).
#
#   scripts/dev-certs.sh OUT_DIR [--san IP:10.0.0.1|DNS:name ...] [--force]
#
# Writes OUT_DIR/ca.crt, ca.key and {scheduler,frontend,worker}.{crt,key}: EC P-256 keys,
# 825-day validity, each role certificate valid as TLS server and client, with the subject
# alternative names 127.0.0.1, localhost and every --san. gRPC clients check the scheduler's
# certificate against the host they dial, so the SANs must cover the address workers and
# frontends use for the scheduler (and the frontend's, for gRPC API clients). Refuses to
# overwrite an existing OUT_DIR/ca.crt unless --force.
set -euo pipefail

usage() {
  echo "usage: $0 OUT_DIR [--san IP:ADDR|DNS:NAME ...] [--force]" >&2
  exit 2
}

out=""
force=0
sans=("IP:127.0.0.1" "DNS:localhost")
while [[ $# -gt 0 ]]; do
  case "$1" in
    --san)
      [[ $# -ge 2 ]] || usage
      [[ "$2" =~ ^(IP|DNS):[A-Za-z0-9.:*_-]+$ ]] || { echo "bad --san '$2' (IP:ADDR or DNS:NAME)" >&2; exit 2; }
      sans+=("$2")
      shift 2
      ;;
    --san=*)
      v="${1#--san=}"
      [[ "$v" =~ ^(IP|DNS):[A-Za-z0-9.:*_-]+$ ]] || { echo "bad --san '$v' (IP:ADDR or DNS:NAME)" >&2; exit 2; }
      sans+=("$v")
      shift
      ;;
    --force) force=1; shift ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [[ -z "$out" ]] || usage; out="$1"; shift ;;
  esac
done
[[ -n "$out" ]] || usage
command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 1; }

if [[ -e "$out/ca.crt" && $force -eq 0 ]]; then
  echo "$out/ca.crt exists; pass --force to make a new CA and certificates" >&2
  exit 1
fi
mkdir -p "$out"
umask 077  # keys readable by their owner only
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

days=825
san_line="$(IFS=,; echo "${sans[*]}")"

openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/ca.key" 2>/dev/null
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days "$days" -subj "/CN=cleave dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$tmp/ca.crt"

cat > "$tmp/ext.cnf" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=${san_line}
EXT

serial=1
for role in scheduler frontend worker; do
  openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/$role.key" 2>/dev/null
  openssl req -new -key "$tmp/$role.key" -subj "/CN=cleave-$role" -out "$tmp/$role.csr"
  openssl x509 -req -in "$tmp/$role.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" \
    -set_serial "$((RANDOM * 65536 + RANDOM + serial))" -days "$days" -sha256 \
    -extfile "$tmp/ext.cnf" -out "$tmp/$role.crt" 2>/dev/null
  serial=$((serial + 1))
done

for f in ca scheduler frontend worker; do
  cp "$tmp/$f.key" "$out/$f.key"
  cp "$tmp/$f.crt" "$out/$f.crt"
  chmod 600 "$out/$f.key"
  chmod 644 "$out/$f.crt"
done
echo "wrote $out: ca.crt ca.key {scheduler,frontend,worker}.{crt,key} (SANs: $san_line, $days days)"
