package main

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/md5"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Throwaway secrets, generated or fixed for the tests only.
const (
	testSecret   = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	testAppID    = "2021000000000001"
	testWxAppID  = "wx0000000000000001"
	testMchID    = "1900000001"
	testAPIKey   = "0123456789abcdef0123456789ABCDEF"
	testAPIV3Key = "v3v3v3v3v3v3v3v3v3v3v3v3v3v3v3v3"
)

// ---------------------------------------------------------------------------------------
// Fixtures: keys, a fake downstream, the peer under test
// ---------------------------------------------------------------------------------------

type delivery struct {
	header http.Header
	body   []byte
}

type downstream struct {
	*httptest.Server
	mu     sync.Mutex
	got    []delivery
	status int
}

func newDownstream(t *testing.T) *downstream {
	d := &downstream{status: http.StatusNoContent}
	d.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		d.mu.Lock()
		d.got = append(d.got, delivery{header: r.Header.Clone(), body: body})
		status := d.status
		d.mu.Unlock()
		w.WriteHeader(status)
	}))
	t.Cleanup(d.Close)
	return d
}

func (d *downstream) take() []delivery {
	d.mu.Lock()
	defer d.mu.Unlock()
	got := d.got
	d.got = nil
	return got
}

type fixture struct {
	peer        *httptest.Server
	down        *downstream
	alipayKey   *rsa.PrivateKey
	wxKey       *rsa.PrivateKey
	wxSerial    string
	otherSerial string
}

var (
	keysOnce         sync.Once
	alipayKey, wxKey *rsa.PrivateKey
)

func testKeys(t *testing.T) (*rsa.PrivateKey, *rsa.PrivateKey) {
	keysOnce.Do(func() {
		var err error
		if alipayKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
		if wxKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
	})
	return alipayKey, wxKey
}

// selfSignedCert makes a platform certificate for key with the given serial and validity.
func selfSignedCert(t *testing.T, key *rsa.PrivateKey, serial int64, notBefore, notAfter time.Time) string {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: "Tenpay.com Root CA test", Organization: []string{"test"}},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	aKey, wKey := testKeys(t)
	spki, err := x509.MarshalPKIXPublicKey(&aKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	validCert := selfSignedCert(t, wKey, 0x5157F09EFDC096DE, now.Add(-time.Hour), now.Add(time.Hour))
	expiredCert := selfSignedCert(t, wKey, 0x1234ABCD, now.Add(-2*time.Hour), now.Add(-time.Hour))
	down := newDownstream(t)
	cfg := &config{
		Listen:            "127.0.0.1:0",
		Downstream:        down.URL + "/events",
		WebhookSecret:     testSecret,
		DeliveryTimeoutMs: 2000,
		Routes: map[string]routeConfig{
			"/alipay": {Provider: "alipay", AppID: testAppID, PublicKey: base64.StdEncoding.EncodeToString(spki)},
			"/wxv2-md5": {Provider: "wechatpay-v2", AppID: testWxAppID, MchID: testMchID,
				SignType: "MD5", APIKey: testAPIKey},
			"/wxv2-hmac": {Provider: "wechatpay-v2", AppID: testWxAppID, MchID: testMchID,
				SignType: "HMAC-SHA256", APIKey: testAPIKey},
			"/wxv3": {Provider: "wechatpay-v3", MchID: testMchID, APIV3Key: testAPIV3Key,
				PlatformCertificates: []certConfig{
					{Serial: "5157F09EFDC096DE", PEM: validCert},
					{Serial: "1234ABCD", PEM: expiredCert},
				}},
		},
	}
	handler, err := newHandler(cfg)
	if err != nil {
		t.Fatal(err)
	}
	peer := httptest.NewServer(handler)
	t.Cleanup(peer.Close)
	return &fixture{peer: peer, down: down, alipayKey: aKey, wxKey: wKey,
		wxSerial: "5157F09EFDC096DE", otherSerial: "1234ABCD"}
}

func (f *fixture) post(t *testing.T, path, contentType string, body []byte, header map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, f.peer.URL+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", contentType)
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(got)
}

// ---------------------------------------------------------------------------------------
// Notifications signed by the platform rules
// ---------------------------------------------------------------------------------------

// alipayBody signs fields with RSA2: every parameter but sign/sign_type, sorted, k=v&…
// (no empty values, so GoPay's and paynotify's sign strings agree).
func alipayBody(t *testing.T, key *rsa.PrivateKey, fields map[string]string) url.Values {
	t.Helper()
	keys := make([]string, 0, len(fields))
	for k := range fields {
		if k != "sign" && k != "sign_type" {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var content strings.Builder
	for i, k := range keys {
		if i > 0 {
			content.WriteByte('&')
		}
		content.WriteString(k + "=" + fields[k])
	}
	sum := sha256.Sum256([]byte(content.String()))
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	form := url.Values{}
	for k, v := range fields {
		form.Set(k, v)
	}
	form.Set("sign", base64.StdEncoding.EncodeToString(sig))
	form.Set("sign_type", "RSA2")
	return form
}

func alipayFields() map[string]string {
	return map[string]string{
		"app_id":          testAppID,
		"auth_app_id":     testAppID,
		"charset":         "utf-8",
		"notify_id":       "2026120300222120000000000000000001",
		"notify_time":     "2026-12-03 12:00:06",
		"notify_type":     "trade_status_sync",
		"version":         "1.0",
		"trade_status":    "TRADE_SUCCESS",
		"out_trade_no":    "ORDER-A-0001",
		"trade_no":        "2026120322001400000000000001",
		"total_amount":    "88.88",
		"receipt_amount":  "88.88",
		"subject":         "演示商品 demo & <test>",
		"gmt_payment":     "2026-12-03 12:00:05",
		"fund_bill_list":  `[{"amount":"88.88","fundChannel":"ALIPAYACCOUNT"}]`,
		"passback_params": "order%3D1%26uid%3D2",
	}
}

// wechatV2Body signs fields with MD5 or HMAC-SHA256 over the sorted non-empty fields and
// "&key=APIKEY", upper-case hex, and writes the XML with CDATA values.
func wechatV2Body(fields map[string]string, signType string) []byte {
	keys := make([]string, 0, len(fields))
	for k, v := range fields {
		if k != "sign" && v != "" {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var content strings.Builder
	for _, k := range keys {
		content.WriteString(k + "=" + fields[k] + "&")
	}
	content.WriteString("key=" + testAPIKey)
	var sum []byte
	if signType == "HMAC-SHA256" {
		mac := hmac.New(sha256.New, []byte(testAPIKey))
		mac.Write([]byte(content.String()))
		sum = mac.Sum(nil)
	} else {
		s := md5.Sum([]byte(content.String()))
		sum = s[:]
	}
	var xml strings.Builder
	xml.WriteString("<xml>")
	for _, k := range keys {
		fmt.Fprintf(&xml, "<%s><![CDATA[%s]]></%s>", k, fields[k], k)
	}
	fmt.Fprintf(&xml, "<sign><![CDATA[%s]]></sign></xml>", strings.ToUpper(hex.EncodeToString(sum)))
	return []byte(xml.String())
}

func wechatV2Fields(signType string) map[string]string {
	f := map[string]string{
		"appid":          testWxAppID,
		"mch_id":         testMchID,
		"nonce_str":      "5d2b6c2a8db53831f7eda20af46e531c",
		"result_code":    "SUCCESS",
		"return_code":    "SUCCESS",
		"openid":         "oDEMOopenid00000000000000001",
		"out_trade_no":   "ORDER-W2-0001",
		"transaction_id": "4200000000202612030000000001",
		"total_fee":      "8888",
		"fee_type":       "CNY",
		"trade_type":     "JSAPI",
		"bank_type":      "OTHERS",
		"time_end":       "20261203120005",
		"is_subscribe":   "N",
	}
	if signType == "HMAC-SHA256" {
		f["sign_type"] = signType
	}
	return f
}

// wechatV3Request encrypts resource with AEAD_AES_256_GCM under the APIv3 key, wraps it in
// the notification envelope and signs "timestamp\nnonce\nbody\n" with SHA256withRSA.
func wechatV3Request(t *testing.T, key *rsa.PrivateKey, serial string, ts int64, resource map[string]any) ([]byte, map[string]string) {
	t.Helper()
	plain, err := json.Marshal(resource)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := aes.NewCipher([]byte(testAPIV3Key))
	gcm, _ := cipher.NewGCM(block)
	nonce, aad := "fdasflkja484", "transaction"
	sealed := gcm.Seal(nil, []byte(nonce), plain, []byte(aad))
	body, err := json.Marshal(map[string]any{
		"id":            "EV-2018022511223320873",
		"create_time":   "2026-12-03T12:00:06+08:00",
		"resource_type": "encrypt-resource",
		"event_type":    "TRANSACTION.SUCCESS",
		"summary":       "支付成功",
		"resource": map[string]any{
			"original_type":   "transaction",
			"algorithm":       "AEAD_AES_256_GCM",
			"ciphertext":      base64.StdEncoding.EncodeToString(sealed),
			"associated_data": aad,
			"nonce":           nonce,
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	timestamp := strconv.FormatInt(ts, 10)
	reqNonce := "593BEC0C930BF1AFEB40B4A08C8FB242"
	sum := sha256.Sum256([]byte(timestamp + "\n" + reqNonce + "\n" + string(body) + "\n"))
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	return body, map[string]string{
		"Wechatpay-Timestamp":      timestamp,
		"Wechatpay-Nonce":          reqNonce,
		"Wechatpay-Signature":      base64.StdEncoding.EncodeToString(sig),
		"Wechatpay-Serial":         serial,
		"Wechatpay-Signature-Type": "WECHATPAY2-SHA256-RSA2048",
	}
}

func wechatV3Resource() map[string]any {
	return map[string]any{
		"appid":            testWxAppID,
		"mchid":            testMchID,
		"out_trade_no":     "ORDER-W3-0001",
		"transaction_id":   "4200000000202612030000000003",
		"trade_type":       "JSAPI",
		"trade_state":      "SUCCESS",
		"trade_state_desc": "支付成功",
		"bank_type":        "CMC",
		"attach":           "",
		"success_time":     "2026-12-03T12:00:05+08:00",
		"payer":            map[string]any{"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
		"amount": map[string]any{"total": 8888, "payer_total": 8888,
			"currency": "CNY", "payer_currency": "CNY"},
	}
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

// checkWebhook verifies the Standard Webhooks headers independently and returns the event.
func checkWebhook(t *testing.T, d delivery) map[string]any {
	t.Helper()
	if ct := d.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("content-type %q", ct)
	}
	id, ts := d.header.Get("Webhook-Id"), d.header.Get("Webhook-Timestamp")
	if _, err := strconv.ParseInt(ts, 10, 64); err != nil {
		t.Errorf("webhook-timestamp %q", ts)
	}
	key, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(testSecret, "whsec_"))
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id + "." + ts + "." + string(d.body)))
	want := "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))
	if got := d.header.Get("Webhook-Signature"); got != want {
		t.Errorf("webhook-signature %q, want %q", got, want)
	}
	var ev map[string]any
	if err := json.Unmarshal(d.body, &ev); err != nil {
		t.Fatalf("event is not JSON: %v: %s", err, d.body)
	}
	if ev["id"] != id {
		t.Errorf("event id %v is not webhook-id %q", ev["id"], id)
	}
	if ev["schemaVersion"] != "1" {
		t.Errorf("schemaVersion %v", ev["schemaVersion"])
	}
	if ra, _ := ev["receivedAt"].(string); len(ra) != 20 || !strings.HasSuffix(ra, "Z") {
		t.Errorf("receivedAt %q", ra)
	}
	return ev
}

func wantID(dedupKey string) string {
	sum := sha256.Sum256([]byte(dedupKey))
	return "evt_" + hex.EncodeToString(sum[:])[:32]
}

func expect(t *testing.T, ev map[string]any, want map[string]any) {
	t.Helper()
	for k, v := range want {
		got := ev[k]
		if k == "amount" {
			a, _ := got.(map[string]any)
			got = fmt.Sprint(a["value"], " ", a["original"], " ", a["currency"])
		}
		if fmt.Sprint(got) != fmt.Sprint(v) {
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
}

func (f *fixture) expectOneDelivery(t *testing.T) map[string]any {
	t.Helper()
	got := f.down.take()
	if len(got) != 1 {
		t.Fatalf("%d downstream POSTs, want exactly 1", len(got))
	}
	return checkWebhook(t, got[0])
}

func (f *fixture) expectNoDelivery(t *testing.T) {
	t.Helper()
	if got := f.down.take(); len(got) != 0 {
		t.Fatalf("%d downstream POSTs, want none", len(got))
	}
}

const (
	v2OK   = "<xml><return_code><![CDATA[SUCCESS]]></return_code><return_msg><![CDATA[OK]]></return_msg></xml>"
	formCT = "application/x-www-form-urlencoded"
)

func v2Fail(reason string) string {
	return "<xml><return_code><![CDATA[FAIL]]></return_code><return_msg><![CDATA[" + reason + "]]></return_msg></xml>"
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

func TestAlipayRSA2(t *testing.T) {
	f := newFixture(t)
	form := alipayBody(t, f.alipayKey, alipayFields())
	status, body := f.post(t, "/alipay", formCT, []byte(form.Encode()), nil)
	if status != 200 || body != "success" {
		t.Fatalf("answer %d %q", status, body)
	}
	ev := f.expectOneDelivery(t)
	expect(t, ev, map[string]any{
		"id":            wantID("alipay|" + testAppID + "|2026120322001400000000000001|TRADE_SUCCESS|"),
		"type":          "payment.succeeded",
		"provider":      "alipay",
		"route":         "alipay",
		"status":        "TRADE_SUCCESS",
		"amount":        "8888 88.88 CNY",
		"orderId":       "ORDER-A-0001",
		"transactionId": "2026120322001400000000000001",
		"occurredAt":    "2026-12-03T12:00:05+08:00",
	})
	data := ev["data"].(map[string]any)
	if _, has := data["sign"]; has {
		t.Error("data carries sign")
	}
	if data["sign_type"] != "RSA2" || data["subject"] != "演示商品 demo & <test>" ||
		data["passback_params"] != "order%3D1%26uid%3D2" {
		t.Errorf("data %v", data)
	}

	// Tampered amount: refused, nothing delivered.
	form.Set("total_amount", "0.01")
	status, body = f.post(t, "/alipay", formCT, []byte(form.Encode()), nil)
	if status != 400 || body != "fail" {
		t.Fatalf("tampered: answer %d %q", status, body)
	}
	f.expectNoDelivery(t)
}

func TestAlipayRefusals(t *testing.T) {
	f := newFixture(t)
	other := alipayFields()
	other["app_id"] = "2021000000000999"
	downgrade := alipayBody(t, f.alipayKey, alipayFields())
	downgrade.Set("sign_type", "RSA")
	for name, form := range map[string]url.Values{
		"another app_id": alipayBody(t, f.alipayKey, other),
		"sign_type RSA":  downgrade,
		"no sign":        {"app_id": {testAppID}, "trade_status": {"TRADE_SUCCESS"}},
	} {
		status, body := f.post(t, "/alipay", formCT, []byte(form.Encode()), nil)
		if status != 400 || body != "fail" {
			t.Errorf("%s: answer %d %q", name, status, body)
		}
		f.expectNoDelivery(t)
	}
}

func TestWechatV2(t *testing.T) {
	for _, tc := range []struct{ path, signType string }{
		{"/wxv2-md5", "MD5"},
		{"/wxv2-hmac", "HMAC-SHA256"},
	} {
		t.Run(tc.signType, func(t *testing.T) {
			f := newFixture(t)
			fields := wechatV2Fields(tc.signType)
			status, body := f.post(t, tc.path, "text/xml", wechatV2Body(fields, tc.signType), nil)
			if status != 200 || body != v2OK {
				t.Fatalf("answer %d %q", status, body)
			}
			ev := f.expectOneDelivery(t)
			expect(t, ev, map[string]any{
				"id": wantID("wechatpay-v2|" + testMchID + "|" + testWxAppID +
					"|4200000000202612030000000001|SUCCESS"),
				"type":          "payment.succeeded",
				"provider":      "wechatpay-v2",
				"route":         tc.path[1:],
				"status":        "SUCCESS",
				"amount":        "8888 8888 CNY",
				"orderId":       "ORDER-W2-0001",
				"transactionId": "4200000000202612030000000001",
				"occurredAt":    "2026-12-03T12:00:05+08:00",
			})
			if data := ev["data"].(map[string]any); data["sign"] != nil || data["openid"] != fields["openid"] {
				t.Errorf("data %v", data)
			}

			// Tampered amount: refused with the FAIL XML, nothing delivered.
			signed := string(wechatV2Body(fields, tc.signType))
			tampered := strings.Replace(signed, "<total_fee><![CDATA[8888]]>", "<total_fee><![CDATA[1]]>", 1)
			status, body = f.post(t, tc.path, "text/xml", []byte(tampered), nil)
			if status != 400 || body != v2Fail("bad_signature") {
				t.Fatalf("tampered: answer %d %q", status, body)
			}
			f.expectNoDelivery(t)
		})
	}
}

func TestWechatV2Refusals(t *testing.T) {
	f := newFixture(t)
	otherMch := wechatV2Fields("MD5")
	otherMch["mch_id"] = "1900000999"
	cases := map[string]struct {
		path   string
		body   []byte
		reason string
	}{
		"another mch_id": {"/wxv2-md5", wechatV2Body(otherMch, "MD5"), "merchant_mismatch"},
		"HMAC sent to the MD5 route": {"/wxv2-md5",
			wechatV2Body(wechatV2Fields("HMAC-SHA256"), "HMAC-SHA256"), "sign_type_mismatch"},
		"not XML": {"/wxv2-md5", []byte("<xml><a>"), "malformed"},
	}
	for name, tc := range cases {
		status, body := f.post(t, tc.path, "text/xml", tc.body, nil)
		if status != 400 || body != v2Fail(tc.reason) {
			t.Errorf("%s: answer %d %q", name, status, body)
		}
		f.expectNoDelivery(t)
	}
}

func TestWechatV3(t *testing.T) {
	f := newFixture(t)
	body, headers := wechatV3Request(t, f.wxKey, f.wxSerial, time.Now().Unix(), wechatV3Resource())
	status, answer := f.post(t, "/wxv3", "application/json", body, headers)
	if status != 204 || answer != "" {
		t.Fatalf("answer %d %q", status, answer)
	}
	ev := f.expectOneDelivery(t)
	expect(t, ev, map[string]any{
		"id":            wantID("wechatpay-v3|" + testMchID + "|4200000000202612030000000003|SUCCESS"),
		"type":          "payment.succeeded",
		"provider":      "wechatpay-v3",
		"route":         "wxv3",
		"status":        "SUCCESS",
		"amount":        "8888 8888 CNY",
		"orderId":       "ORDER-W3-0001",
		"transactionId": "4200000000202612030000000003",
		"occurredAt":    "2026-12-03T12:00:05+08:00",
	})
	data := ev["data"].(map[string]any)
	notification := data["notification"].(map[string]any)
	res := notification["resource"].(map[string]any)
	if _, has := res["ciphertext"]; has || res["nonce"] != "fdasflkja484" || notification["event_type"] != "TRANSACTION.SUCCESS" {
		t.Errorf("notification %v", notification)
	}
	resource := data["resource"].(map[string]any)
	if resource["mchid"] != testMchID || resource["attach"] != "" {
		t.Errorf("resource %v", resource)
	}

	// Tampered body: refused, nothing delivered.
	tampered := bytes.Replace(body, []byte("支付成功"), []byte("支付失败"), 1)
	status, answer = f.post(t, "/wxv3", "application/json", tampered, headers)
	if status != 400 || answer != `{"code":"FAIL","message":"bad_signature"}` {
		t.Fatalf("tampered: answer %d %q", status, answer)
	}
	f.expectNoDelivery(t)
}

func TestWechatV3Refusals(t *testing.T) {
	f := newFixture(t)
	now := time.Now().Unix()
	otherMch := wechatV3Resource()
	otherMch["mchid"] = "1900000999"
	mismatch, mismatchH := wechatV3Request(t, f.wxKey, f.wxSerial, now, otherMch)
	stale, staleH := wechatV3Request(t, f.wxKey, f.wxSerial, now-600, wechatV3Resource())
	unknown, unknownH := wechatV3Request(t, f.wxKey, "ABCDEF", now, wechatV3Resource())
	expired, expiredH := wechatV3Request(t, f.wxKey, f.otherSerial, now, wechatV3Resource())
	probe, probeH := wechatV3Request(t, f.wxKey, f.wxSerial, now, wechatV3Resource())
	probeH["Wechatpay-Signature"] = "WECHATPAY/SIGNTEST/" + probeH["Wechatpay-Signature"]
	// A ciphertext that does not open: the signature is valid, the GCM tag is not.
	good, _ := wechatV3Request(t, f.wxKey, f.wxSerial, now, wechatV3Resource())
	var env map[string]any
	_ = json.Unmarshal(good, &env)
	env["resource"].(map[string]any)["associated_data"] = "other"
	badTag, _ := json.Marshal(env)
	badTagH := signV3(t, f.wxKey, f.wxSerial, now, badTag)

	for name, tc := range map[string]struct {
		body   []byte
		h      map[string]string
		reason string
	}{
		"another mchid":       {mismatch, mismatchH, "merchant_mismatch"},
		"stale timestamp":     {stale, staleH, "stale_timestamp"},
		"unknown serial":      {unknown, unknownH, "unknown_serial"},
		"expired certificate": {expired, expiredH, "unknown_serial"},
		"signature probe":     {probe, probeH, "bad_signature"},
		"GCM tag failure":     {badTag, badTagH, "decrypt_failed"},
	} {
		status, answer := f.post(t, "/wxv3", "application/json", tc.body, tc.h)
		if status != 400 || answer != `{"code":"FAIL","message":"`+tc.reason+`"}` {
			t.Errorf("%s: answer %d %q", name, status, answer)
		}
		f.expectNoDelivery(t)
	}
}

func signV3(t *testing.T, key *rsa.PrivateKey, serial string, ts int64, body []byte) map[string]string {
	t.Helper()
	timestamp := strconv.FormatInt(ts, 10)
	sum := sha256.Sum256([]byte(timestamp + "\nn0nce\n" + string(body) + "\n"))
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	return map[string]string{
		"Wechatpay-Timestamp": timestamp,
		"Wechatpay-Nonce":     "n0nce",
		"Wechatpay-Signature": base64.StdEncoding.EncodeToString(sig),
		"Wechatpay-Serial":    serial,
	}
}

// Downstream failure: the platform gets the failure answer (503) so that it retries.
func TestDownstreamFailure(t *testing.T) {
	f := newFixture(t)
	f.down.mu.Lock()
	f.down.status = http.StatusInternalServerError
	f.down.mu.Unlock()

	form := alipayBody(t, f.alipayKey, alipayFields())
	if status, body := f.post(t, "/alipay", formCT, []byte(form.Encode()), nil); status != 503 || body != "fail" {
		t.Errorf("alipay: answer %d %q", status, body)
	}
	if got := f.down.take(); len(got) != 1 {
		t.Errorf("alipay: %d POSTs, want 1", len(got))
	}
	status, body := f.post(t, "/wxv2-md5", "text/xml", wechatV2Body(wechatV2Fields("MD5"), "MD5"), nil)
	if status != 503 || body != v2Fail("temporarily_unavailable") {
		t.Errorf("v2: answer %d %q", status, body)
	}
	f.down.take()
	v3body, h := wechatV3Request(t, f.wxKey, f.wxSerial, time.Now().Unix(), wechatV3Resource())
	status, body = f.post(t, "/wxv3", "application/json", v3body, h)
	if status != 503 || body != `{"code":"FAIL","message":"temporarily_unavailable"}` {
		t.Errorf("v3: answer %d %q", status, body)
	}
	f.down.take()
}

func TestRoutingAndLimits(t *testing.T) {
	f := newFixture(t)
	if status, _ := f.post(t, "/nowhere", formCT, []byte("a=b"), nil); status != 404 {
		t.Errorf("unknown path: %d", status)
	}
	resp, err := http.Get(f.peer.URL + "/alipay")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 405 {
		t.Errorf("GET: %d", resp.StatusCode)
	}
	big := bytes.Repeat([]byte("a"), maxBodyBytes+1)
	if status, body := f.post(t, "/wxv2-md5", "text/xml", big, nil); status != 413 || body != v2Fail("oversize") {
		t.Errorf("oversize: %d %q", status, body)
	}
	f.expectNoDelivery(t)
}

func TestVectors(t *testing.T) {
	// paynotify's README example event id for the demo Alipay notification.
	if got := eventID("alipay|2021000000000001|2026120322001400000000000001|TRADE_SUCCESS|"); got != "evt_66841b0ac554d3d120c50886c1b0cb5b" {
		t.Errorf("event id %s", got)
	}
	// The Standard Webhooks specification's example.
	d, err := newDeliverer("http://127.0.0.1:1/", testSecret, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := d.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", []byte(`{"test": 2432232314}`)); got != "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=" {
		t.Errorf("signature %s", got)
	}
	for in, want := range map[string]int64{"88.88": 8888, "0.01": 1, "1.5": 150, "100": 10000} {
		if got, ok := yuanToMinor(in); !ok || got != want {
			t.Errorf("yuanToMinor(%q) = %d, %v", in, got, ok)
		}
	}
	for _, bad := range []string{"", ".5", "1.", "1.234", "-1", "1e3", " 1", "1,00"} {
		if _, ok := yuanToMinor(bad); ok {
			t.Errorf("yuanToMinor(%q) accepted", bad)
		}
	}
}
