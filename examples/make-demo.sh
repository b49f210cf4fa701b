#!/usr/bin/env bash
# Regenerates the demo keys and the signed sample notifications under examples/.
# Private keys exist only in a temporary directory and are deleted at the end: only the
# public halves, the symmetric demo keys and the signed samples are kept.
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Alipay: an RSA-2048 key pair standing in for Alipay's; the console shows the public key
# as one line of base64 SubjectPublicKeyInfo, which is what the demo route reads.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/alipay.pem" 2>/dev/null
openssl pkey -in "$work/alipay.pem" -pubout -outform DER | base64 -w0 > keys/alipay_public.txt
echo >> keys/alipay_public.txt

# WeChat Pay: a 32-character API key (v2) and APIv3 key, and a public key for APIv3.
python3 -c 'import secrets,string; a=string.ascii_letters+string.digits; print("".join(secrets.choice(a) for _ in range(32)))' > keys/wechatpay_v2_api_key.txt
python3 -c 'import secrets,string; a=string.ascii_letters+string.digits; print("".join(secrets.choice(a) for _ in range(32)))' > keys/wechatpay_v3_api_v3_key.txt
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/wechat.pem" 2>/dev/null
openssl pkey -in "$work/wechat.pem" -pubout > keys/wechatpay_v3_public.pem

# The Standard Webhooks secret for signing deliveries.
echo "whsec_$(openssl rand -base64 32)" > keys/webhook_secret.txt

# A signed Alipay payment notification (sign string: every parameter but sign and
# sign_type, sorted, k=v joined with &; SHA256withRSA).
python3 - "$work" <<'PY'
import subprocess, sys, urllib.parse, base64
work = sys.argv[1]
params = {
    "app_id": "2021000000000001", "auth_app_id": "2021000000000001", "charset": "utf-8",
    "notify_id": "2026120300222120000000000000000001", "notify_time": "2026-12-03 12:00:06",
    "notify_type": "trade_status_sync", "version": "1.0", "trade_status": "TRADE_SUCCESS",
    "out_trade_no": "DEMO-ORDER-0001", "trade_no": "2026120322001400000000000001",
    "total_amount": "88.88", "receipt_amount": "88.88", "buyer_id": "2088000000000001",
    "seller_id": "2088000000000002", "subject": "演示商品 demo", "gmt_create": "2026-12-03 12:00:00",
    "gmt_payment": "2026-12-03 12:00:05",
}
content = "&".join(f"{k}={params[k]}" for k in sorted(params)).encode()
sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", f"{work}/alipay.pem"], input=content,
                     capture_output=True, check=True).stdout
params["sign"] = base64.b64encode(sig).decode()
params["sign_type"] = "RSA2"
open("notifications/alipay.txt", "w").write(urllib.parse.urlencode(params))

# A signed WeChat Pay v2 payment notification (MD5).
import hashlib
key = open("keys/wechatpay_v2_api_key.txt").read().strip()
fields = {
    "appid": "wx0000000000000001", "mch_id": "1900000001", "nonce_str": "5d2b6c2a8db53831f7eda20af46e531c",
    "result_code": "SUCCESS", "return_code": "SUCCESS", "openid": "oDEMOopenid00000000000000001",
    "out_trade_no": "DEMO-ORDER-0002", "transaction_id": "4200000000202612030000000001",
    "total_fee": "8888", "fee_type": "CNY", "trade_type": "JSAPI", "bank_type": "OTHERS",
    "time_end": "20261203120005", "is_subscribe": "N",
}
s = "&".join(f"{k}={fields[k]}" for k in sorted(fields) if fields[k]) + "&key=" + key
fields["sign"] = hashlib.md5(s.encode()).hexdigest().upper()
xml = "<xml>" + "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in fields.items()) + "</xml>"
open("notifications/wechatpay_v2.xml", "w").write(xml)
PY
# The same keys as Kubernetes Secrets for examples/kubernetes.
python3 - <<'PY'
import textwrap
read = lambda f: open(f"keys/{f}").read()
pem = textwrap.indent(read("wechatpay_v3_public.pem"), "    ")
open("kubernetes/10-secrets.yaml", "w").write(f"""# Demo keys (the same throwaway keys as examples/keys, made by examples/make-demo.sh).
# In production, create these Secrets from your own key files, e.g.
#   kubectl -n shop create secret generic alipay --from-file=alipay_public_key=alipayPublicKey_RSA2.txt
apiVersion: v1
kind: Secret
metadata:
  name: alipay
  namespace: paynotify-demo
stringData:
  # The Alipay public key as the console shows it (one line of base64).
  alipay_public_key: {read("alipay_public.txt").strip()}
---
apiVersion: v1
kind: Secret
metadata:
  name: wechatpay
  namespace: paynotify-demo
stringData:
  api_key: {read("wechatpay_v2_api_key.txt").strip()}
  api_v3_key: {read("wechatpay_v3_api_v3_key.txt").strip()}
  public_key.pem: |
{pem}---
apiVersion: v1
kind: Secret
metadata:
  name: webhook
  namespace: paynotify-demo
stringData:
  # Standard Webhooks secret that signs deliveries to the targets (whsec_<base64>).
  secret: {read("webhook_secret.txt").strip()}
""")
PY
echo "demo keys and notifications regenerated"
