// Command gopay-peer is the benchmark's reference peer: a plain net/http server that handles
// Alipay and WeChat Pay (v2 and APIv3) payment notifications the way a careful user of GoPay
// (github.com/go-pay/gopay) would, and then does the same work paynotify does: check the
// merchant ids, build paynotify's normalized event, sign it with Standard Webhooks, POST it
// downstream, and answer the platform only after downstream answered 2xx.
//
// Usage: gopay-peer -config peer.json
package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/go-pay/crypto/xpem"
	"github.com/go-pay/crypto/xrsa"
	"github.com/go-pay/gopay"
	"github.com/go-pay/gopay/alipay"
	"github.com/go-pay/gopay/wechat"
	wechatv3 "github.com/go-pay/gopay/wechat/v3"
)

// maxBodyBytes is paynotify's default body cap (256 KiB); larger bodies get 413.
const maxBodyBytes = 256 << 10

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

type config struct {
	Listen            string                 `json:"listen"`
	Downstream        string                 `json:"downstream"`
	WebhookSecret     string                 `json:"webhookSecret"`
	DeliveryTimeoutMs int                    `json:"deliveryTimeoutMs"`
	Routes            map[string]routeConfig `json:"routes"`
}

type routeConfig struct {
	Provider string `json:"provider"` // alipay | wechatpay-v2 | wechatpay-v3
	AppID    string `json:"appId"`    // alipay, wechatpay-v2; optional for wechatpay-v3
	MchID    string `json:"mchId"`    // wechatpay-v2, wechatpay-v3
	SignType string `json:"signType"` // alipay: RSA2 (default) or RSA; wechatpay-v2: MD5 or HMAC-SHA256

	PublicKey string `json:"publicKey"` // alipay: the console's one-line base64 SPKI
	APIKey    string `json:"apiKey"`    // wechatpay-v2: the 32-character API key

	APIV3Key             string       `json:"apiV3Key"`             // wechatpay-v3
	PlatformCertificates []certConfig `json:"platformCertificates"` // wechatpay-v3
	MaxClockSkewSeconds  int          `json:"maxClockSkewSeconds"`  // wechatpay-v3, default 300
}

type certConfig struct {
	Serial string `json:"serial"`
	PEM    string `json:"pem"`
}

func loadConfig(path string) (*config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	var cfg config
	if err := dec.Decode(&cfg); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &cfg, nil
}

// ---------------------------------------------------------------------------------------
// The normalized event (paynotify's docs/event.schema.json)
// ---------------------------------------------------------------------------------------

type amount struct {
	Value    int64  `json:"value"`
	Original string `json:"original"`
	Currency string `json:"currency"`
}

// event mirrors paynotify's PaymentEvent field for field and in the same order.
type event struct {
	SchemaVersion    string  `json:"schemaVersion"`
	ID               string  `json:"id"`
	Type             string  `json:"type"`
	Provider         string  `json:"provider"`
	Route            string  `json:"route"`
	ReceivedAt       string  `json:"receivedAt"`
	OccurredAt       string  `json:"occurredAt,omitempty"`
	Status           string  `json:"status"`
	Amount           *amount `json:"amount,omitempty"`
	OrderID          string  `json:"orderId,omitempty"`
	TransactionID    string  `json:"transactionId,omitempty"`
	RefundID         string  `json:"refundId,omitempty"`
	PlatformRefundID string  `json:"platformRefundId,omitempty"`
	Data             any     `json:"data"`

	dedupKey string
}

// eventID is "evt_" and the first 32 hex digits of SHA-256(dedup key).
func eventID(dedupKey string) string {
	sum := sha256.Sum256([]byte(dedupKey))
	return "evt_" + hex.EncodeToString(sum[:16])
}

// encodeEvent writes the event as compact JSON without HTML escaping (as serde_json does).
func encodeEvent(ev *event) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(2048)
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(ev); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte{'\n'}), nil
}

// ---------------------------------------------------------------------------------------
// Delivery: one shared client, Standard Webhooks signature
// ---------------------------------------------------------------------------------------

type deliverer struct {
	client *http.Client
	url    string
	secret []byte
}

func newDeliverer(url, secret string, timeout time.Duration) (*deliverer, error) {
	b64, ok := strings.CutPrefix(strings.TrimSpace(secret), "whsec_")
	if !ok {
		return nil, errors.New("webhookSecret must look like whsec_<base64>")
	}
	key, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf("webhookSecret: %w", err)
	}
	if len(key) < 24 {
		return nil, fmt.Errorf("webhookSecret is too short: %d bytes, at least 24", len(key))
	}
	if !strings.HasPrefix(url, "http://") && !strings.HasPrefix(url, "https://") {
		return nil, fmt.Errorf("downstream %q is not an http(s) URL", url)
	}
	transport := &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   timeout,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		MaxIdleConns:        0,    // no global cap
		MaxIdleConnsPerHost: 1024, // keep a connection per in-flight request alive
		IdleConnTimeout:     60 * time.Second,
		DisableCompression:  true, // tiny JSON answers
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: timeout,
	}
	return &deliverer{
		client: &http.Client{
			Transport: transport,
			Timeout:   timeout,
			// A 3xx from downstream is a misconfiguration, not a delivery.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		url:    url,
		secret: key,
	}, nil
}

// sign returns the webhook-signature value for id, timestamp and body.
func (d *deliverer) sign(id, timestamp string, body []byte) string {
	mac := hmac.New(sha256.New, d.secret)
	mac.Write([]byte(id))
	mac.Write([]byte{'.'})
	mac.Write([]byte(timestamp))
	mac.Write([]byte{'.'})
	mac.Write(body)
	return "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))
}

// deliver POSTs the event; nil only when downstream answered 2xx.
func (d *deliverer) deliver(ctx context.Context, ev *event, now time.Time) error {
	body, err := encodeEvent(ev)
	if err != nil {
		return err
	}
	ts := strconv.FormatInt(now.Unix(), 10)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header = http.Header{
		"Content-Type":      {"application/json"},
		"User-Agent":        {"gopay-peer/1"},
		"Webhook-Id":        {ev.ID},
		"Webhook-Timestamp": {ts},
		"Webhook-Signature": {d.sign(ev.ID, ts, body)},
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return err
	}
	// Drain (bounded) so that the connection goes back to the pool.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("downstream answered %d", resp.StatusCode)
	}
	return nil
}

// ---------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------

// rejection is a refused notification: the HTTP status and paynotify's reason word.
type rejection struct {
	status int
	reason string
}

func reject(reason string) *rejection {
	return &rejection{status: http.StatusBadRequest, reason: reason}
}

// readFailure maps a body read/parse error: over the cap is 413, anything else malformed.
func readFailure(err error) *rejection {
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return &rejection{status: http.StatusRequestEntityTooLarge, reason: "oversize"}
	}
	return reject("malformed")
}

// provider is one platform's adapter around GoPay.
type provider interface {
	name() string
	// authenticate parses and verifies the request and fills the event's platform fields.
	authenticate(r *http.Request, now time.Time) (*event, *rejection)
	success(w http.ResponseWriter)
	failure(w http.ResponseWriter, status int, reason string)
}

type route struct {
	name string // the path without the leading slash
	p    provider
	d    *deliverer
}

func (rt *route) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	r.Body = http.MaxBytesReader(w, r.Body, maxBodyBytes)
	ev, rej := rt.p.authenticate(r, now)
	if rej != nil {
		rt.p.failure(w, rej.status, rej.reason)
		return
	}
	ev.SchemaVersion = "1"
	ev.ID = eventID(ev.dedupKey)
	ev.Provider = rt.p.name()
	ev.Route = rt.name
	ev.ReceivedAt = now.UTC().Format("2006-01-02T15:04:05Z")
	if err := rt.d.deliver(r.Context(), ev, now); err != nil {
		// Off the success path, like paynotify's "delivery failed" warning.
		log.Printf("route %s: event %s: delivery failed: %v", rt.name, ev.ID, err)
		rt.p.failure(w, http.StatusServiceUnavailable, "temporarily_unavailable")
		return
	}
	rt.p.success(w)
}

// deliveryTimeout is the configured per-delivery timeout (default 3s, as paynotify's).
func deliveryTimeout(cfg *config) time.Duration {
	if cfg.DeliveryTimeoutMs == 0 {
		return 3 * time.Second
	}
	return time.Duration(cfg.DeliveryTimeoutMs) * time.Millisecond
}

func newHandler(cfg *config) (http.Handler, error) {
	timeout := deliveryTimeout(cfg)
	if timeout < 100*time.Millisecond || timeout > 60*time.Second {
		return nil, fmt.Errorf("deliveryTimeoutMs must be 100..60000, got %d", cfg.DeliveryTimeoutMs)
	}
	d, err := newDeliverer(cfg.Downstream, cfg.WebhookSecret, timeout)
	if err != nil {
		return nil, err
	}
	if len(cfg.Routes) == 0 {
		return nil, errors.New("no routes")
	}
	mux := http.NewServeMux()
	for path, rc := range cfg.Routes {
		if !strings.HasPrefix(path, "/") || len(path) < 2 || strings.ContainsAny(path, "{}?# ") {
			return nil, fmt.Errorf("route %q: the path must be like /name", path)
		}
		var p provider
		switch rc.Provider {
		case "alipay":
			p, err = newAlipay(rc)
		case "wechatpay-v2":
			p, err = newWechatV2(rc)
		case "wechatpay-v3":
			p, err = newWechatV3(rc)
		default:
			err = fmt.Errorf("unknown provider %q", rc.Provider)
		}
		if err != nil {
			return nil, fmt.Errorf("route %q: %w", path, err)
		}
		// Exact path, POST only: other methods get 405, other paths 404.
		mux.Handle("POST "+path, &route{name: path[1:], p: p, d: d})
	}
	return mux, nil
}

// ---------------------------------------------------------------------------------------
// Shared normalization helpers (the same rules as paynotify's provider/mod.rs)
// ---------------------------------------------------------------------------------------

// yuanToMinor converts "88.88" (yuan, at most two decimals) to 8888 fen.
func yuanToMinor(text string) (int64, bool) {
	intPart, frac, hasDot := strings.Cut(text, ".")
	if intPart == "" || len(intPart) > 15 || len(frac) > 2 || (hasDot && frac == "") ||
		!allDigits(intPart) || !allDigits(frac) {
		return 0, false
	}
	v, err := strconv.ParseInt(intPart, 10, 64)
	if err != nil {
		return 0, false
	}
	v *= 100
	switch len(frac) {
	case 1:
		v += int64(frac[0]-'0') * 10
	case 2:
		v += int64(frac[0]-'0')*10 + int64(frac[1]-'0')
	}
	return v, true
}

// fenAmount parses an amount already in fen ("8888").
func fenAmount(text, currency string) (*amount, bool) {
	if text == "" || !allDigits(text) {
		return nil, false
	}
	v, err := strconv.ParseInt(text, 10, 64)
	if err != nil {
		return nil, false
	}
	return &amount{Value: v, Original: text, Currency: currency}, true
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// chinaTime converts "yyyy-MM-dd HH:mm:ss" (China Standard Time) to RFC 3339.
func chinaTime(s string) string {
	if len(s) != 19 || s[4] != '-' || s[7] != '-' || s[10] != ' ' || s[13] != ':' || s[16] != ':' {
		return ""
	}
	for i := 0; i < len(s); i++ {
		switch i {
		case 4, 7, 10, 13, 16:
		default:
			if s[i] < '0' || s[i] > '9' {
				return ""
			}
		}
	}
	return s[:10] + "T" + s[11:] + "+08:00"
}

// compactChinaTime converts "yyyyMMddHHmmss" (China Standard Time) to RFC 3339.
func compactChinaTime(s string) string {
	if len(s) != 14 || !allDigits(s) {
		return ""
	}
	return s[0:4] + "-" + s[4:6] + "-" + s[6:8] + "T" + s[8:10] + ":" + s[10:12] + ":" + s[12:14] + "+08:00"
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// ---------------------------------------------------------------------------------------
// Alipay
// ---------------------------------------------------------------------------------------

type alipayRoute struct {
	appID     string
	signType  string // RSA2 or RSA
	publicKey string // one-line base64 SPKI, as alipay.VerifySign takes it
}

func newAlipay(rc routeConfig) (*alipayRoute, error) {
	if rc.AppID == "" {
		return nil, errors.New("appId is required")
	}
	signType := orDefault(rc.SignType, alipay.RSA2)
	if signType != alipay.RSA2 && signType != alipay.RSA {
		return nil, fmt.Errorf("signType must be RSA2 or RSA, got %q", rc.SignType)
	}
	// Fail at start on a bad key, with the same helpers alipay.VerifySign uses.
	key, err := xpem.DecodePublicKey([]byte(xrsa.FormatAlipayPublicKey(rc.PublicKey)))
	if err != nil || key == nil {
		return nil, fmt.Errorf("publicKey is not a one-line base64 RSA SPKI: %v", err)
	}
	return &alipayRoute{appID: rc.AppID, signType: signType, publicKey: rc.PublicKey}, nil
}

func (a *alipayRoute) name() string { return "alipay" }

func (a *alipayRoute) success(w http.ResponseWriter) {
	w.Header()["Content-Type"] = []string{"text/plain; charset=utf-8"}
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, "success")
}

func (a *alipayRoute) failure(w http.ResponseWriter, status int, _ string) {
	w.Header()["Content-Type"] = []string{"text/plain; charset=utf-8"}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, "fail")
}

func (a *alipayRoute) authenticate(r *http.Request, _ time.Time) (*event, *rejection) {
	bm, err := alipay.ParseNotifyToBodyMap(r)
	if err != nil {
		return nil, readFailure(err)
	}
	if len(bm) == 0 {
		return nil, reject("empty_body")
	}
	if bm.GetString("sign") == "" {
		return nil, reject("missing_signature")
	}
	// alipay.VerifySign picks the hash from the notification's own sign_type (and SHA-256
	// when it is missing or unknown): pin it to the route's, as paynotify does.
	signType, hadSignType := bm["sign_type"]
	if st := bm.GetString("sign_type"); st != "" && st != a.signType {
		return nil, reject("sign_type_mismatch")
	}
	if !alipayTextOK(bm) {
		return nil, reject("invalid_utf8")
	}
	// VerifySign deletes sign and sign_type from bm; what stays is the verified data.
	if ok, err := alipay.VerifySign(a.publicKey, bm); err != nil || !ok {
		return nil, reject("bad_signature")
	}
	if hadSignType {
		bm["sign_type"] = signType // kept in the event's data, as paynotify does
	}
	appID := bm.GetString("app_id")
	if appID == "" {
		return nil, reject("malformed")
	}
	if appID != a.appID {
		return nil, reject("merchant_mismatch")
	}
	return normalizeAlipay(bm, appID)
}

// alipayTextOK checks that a utf-8 notification really is UTF-8. GBK notifications verify
// over their raw bytes with GoPay; they are not transcoded (GoPay has no GBK support).
func alipayTextOK(bm gopay.BodyMap) bool {
	switch strings.ToLower(bm.GetString("charset")) {
	case "", "utf-8", "utf8":
	default:
		return true
	}
	for k, v := range bm {
		s, _ := v.(string)
		if !utf8.ValidString(k) || !utf8.ValidString(s) {
			return false
		}
	}
	return true
}

func normalizeAlipay(bm gopay.BodyMap, appID string) (*event, *rejection) {
	status := bm.GetString("trade_status")
	if status == "" {
		return nil, reject("unsupported_event")
	}
	tradeNo := bm.GetString("trade_no")
	outTradeNo := bm.GetString("out_trade_no")
	if tradeNo == "" || outTradeNo == "" {
		return nil, reject("malformed")
	}
	// Alipay reports refunds as a trade notification carrying the refund's fields.
	refundNo := ""
	if bm.GetString("refund_fee") != "" {
		refundNo = bm.GetString("out_biz_no")
	}
	ev := &event{Status: status, OrderID: outTradeNo, TransactionID: tradeNo, RefundID: refundNo, Data: bm}
	amountField, timeFields := "total_amount", []string{"gmt_close", "gmt_payment", "notify_time"}
	switch {
	case refundNo != "":
		ev.Type = "refund.succeeded"
		amountField, timeFields = "refund_fee", []string{"gmt_refund", "gmt_close", "notify_time"}
	case status == "TRADE_SUCCESS":
		ev.Type = "payment.succeeded"
	case status == "TRADE_FINISHED":
		ev.Type = "payment.finished"
	case status == "TRADE_CLOSED":
		ev.Type = "payment.closed"
	case status == "WAIT_BUYER_PAY":
		ev.Type = "payment.pending"
	default:
		return nil, reject("unsupported_event")
	}
	if original := bm.GetString(amountField); original != "" {
		v, ok := yuanToMinor(original)
		if !ok {
			return nil, reject("malformed")
		}
		ev.Amount = &amount{Value: v, Original: original, Currency: orDefault(bm.GetString("currency"), "CNY")}
	}
	for _, f := range timeFields {
		if t := chinaTime(bm.GetString(f)); t != "" {
			ev.OccurredAt = t
			break
		}
	}
	ev.dedupKey = "alipay|" + appID + "|" + tradeNo + "|" + status + "|" + refundNo
	return ev, nil
}

// ---------------------------------------------------------------------------------------
// WeChat Pay API v2
// ---------------------------------------------------------------------------------------

type wechatV2Route struct {
	appID, mchID string
	signType     string // wechat.SignType_MD5 or wechat.SignType_HMAC_SHA256
	apiKey       string
}

func newWechatV2(rc routeConfig) (*wechatV2Route, error) {
	if rc.AppID == "" || rc.MchID == "" {
		return nil, errors.New("appId and mchId are required")
	}
	if rc.SignType != wechat.SignType_MD5 && rc.SignType != wechat.SignType_HMAC_SHA256 {
		return nil, fmt.Errorf("signType must be MD5 or HMAC-SHA256, got %q", rc.SignType)
	}
	if len(rc.APIKey) != 32 {
		return nil, fmt.Errorf("apiKey must be 32 characters, got %d", len(rc.APIKey))
	}
	return &wechatV2Route{appID: rc.AppID, mchID: rc.MchID, signType: rc.SignType, apiKey: rc.APIKey}, nil
}

func (v *wechatV2Route) name() string { return "wechatpay-v2" }

func (v *wechatV2Route) success(w http.ResponseWriter) {
	writeV2(w, http.StatusOK, &wechat.NotifyResponse{ReturnCode: gopay.SUCCESS, ReturnMsg: gopay.OK})
}

func (v *wechatV2Route) failure(w http.ResponseWriter, status int, reason string) {
	writeV2(w, status, &wechat.NotifyResponse{ReturnCode: gopay.FAIL, ReturnMsg: reason})
}

func writeV2(w http.ResponseWriter, status int, rsp *wechat.NotifyResponse) {
	w.Header()["Content-Type"] = []string{"application/xml; charset=utf-8"}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, rsp.ToXmlString())
}

func (v *wechatV2Route) authenticate(r *http.Request, _ time.Time) (*event, *rejection) {
	bm, err := wechat.ParseNotifyToBodyMap(r)
	if err != nil {
		return nil, readFailure(err)
	}
	if _, isRefund := bm["req_info"]; isRefund {
		return v.refund(bm)
	}
	sign := bm.GetString("sign")
	if sign == "" {
		return nil, reject("missing_signature")
	}
	// GoPay never reads sign_type from the message; refuse one that is not the route's.
	if st := bm.GetString("sign_type"); st != "" && st != v.signType {
		return nil, reject("sign_type_mismatch")
	}
	// VerifySign deletes sign from bm; what stays is the verified data.
	if ok, err := wechat.VerifySign(v.apiKey, v.signType, bm); err != nil || !ok {
		if (v.signType == wechat.SignType_MD5 && len(sign) == 64) ||
			(v.signType == wechat.SignType_HMAC_SHA256 && len(sign) == 32) {
			return nil, reject("sign_type_mismatch")
		}
		return nil, reject("bad_signature")
	}
	if bm.GetString("appid") != v.appID || bm.GetString("mch_id") != v.mchID {
		return nil, reject("merchant_mismatch")
	}
	if bm.GetString("return_code") != gopay.SUCCESS {
		return nil, reject("unsupported_event")
	}
	status := bm.GetString("result_code")
	if status == "" {
		return nil, reject("malformed")
	}
	ev := &event{Status: status, Data: bm}
	switch status {
	case "SUCCESS":
		ev.Type = "payment.succeeded"
	case "FAIL":
		ev.Type = "payment.failed"
	default:
		return nil, reject("unsupported_event")
	}
	ev.OrderID = bm.GetString("out_trade_no")
	ev.TransactionID = bm.GetString("transaction_id")
	if ev.OrderID == "" || (ev.Type == "payment.succeeded" && ev.TransactionID == "") {
		return nil, reject("malformed")
	}
	if total := bm.GetString("total_fee"); total != "" {
		a, ok := fenAmount(total, orDefault(bm.GetString("fee_type"), "CNY"))
		if !ok {
			return nil, reject("malformed")
		}
		ev.Amount = a
	}
	ev.OccurredAt = compactChinaTime(bm.GetString("time_end"))
	ev.dedupKey = "wechatpay-v2|" + v.mchID + "|" + v.appID + "|" +
		orDefault(ev.TransactionID, ev.OrderID) + "|" + status
	return ev, nil
}

// refund handles a refund notification: no sign; the AES-256-ECB req_info authenticates it.
func (v *wechatV2Route) refund(bm gopay.BodyMap) (*event, *rejection) {
	info, err := wechat.DecryptRefundNotifyReqInfo(bm.GetString("req_info"), v.apiKey)
	if err != nil {
		return nil, reject("decrypt_failed")
	}
	if bm.GetString("return_code") != gopay.SUCCESS {
		return nil, reject("unsupported_event")
	}
	if bm.GetString("appid") != v.appID || bm.GetString("mch_id") != v.mchID {
		return nil, reject("merchant_mismatch")
	}
	status := info.RefundStatus
	ev := &event{Status: status}
	switch status {
	case "":
		return nil, reject("malformed")
	case "SUCCESS":
		ev.Type = "refund.succeeded"
	case "CHANGE":
		ev.Type = "refund.abnormal"
	case "REFUNDCLOSE":
		ev.Type = "refund.closed"
	default:
		return nil, reject("unsupported_event")
	}
	if info.RefundId == "" {
		return nil, reject("malformed")
	}
	a, ok := fenAmount(info.RefundFee, "CNY")
	if !ok {
		return nil, reject("malformed")
	}
	ev.Amount = a
	ev.OrderID, ev.TransactionID = info.OutTradeNo, info.TransactionId
	ev.RefundID, ev.PlatformRefundID = info.OutRefundNo, info.RefundId
	ev.OccurredAt = chinaTime(info.SuccessTime)
	// GoPay decrypts into a fixed struct: its non-empty fields are the decrypted data.
	inner := map[string]string{}
	for k, val := range map[string]string{
		"transaction_id": info.TransactionId, "out_trade_no": info.OutTradeNo,
		"refund_id": info.RefundId, "out_refund_no": info.OutRefundNo,
		"total_fee": info.TotalFee, "settlement_total_fee": info.SettlementTotalFee,
		"refund_fee": info.RefundFee, "settlement_refund_fee": info.SettlementRefundFee,
		"refund_status": info.RefundStatus, "success_time": info.SuccessTime,
		"refund_recv_accout": info.RefundRecvAccout, "refund_account": info.RefundAccount,
		"refund_request_source": info.RefundRequestSource,
	} {
		if val != "" {
			inner[k] = val
		}
	}
	bm["req_info"] = inner
	ev.Data = bm
	ev.dedupKey = "wechatpay-v2|" + v.mchID + "|refund|" + info.RefundId + "|" + status
	return ev, nil
}

// ---------------------------------------------------------------------------------------
// WeChat Pay APIv3
// ---------------------------------------------------------------------------------------

const (
	v3SignatureType = "WECHATPAY2-SHA256-RSA2048"
	v3SignTestProbe = "WECHATPAY/SIGNTEST/"
)

type platformCert struct {
	notBefore, notAfter time.Time
}

type wechatV3Route struct {
	mchID, appID string
	apiV3Key     string
	keys         map[string]*rsa.PublicKey // by Wechatpay-Serial, for VerifySignByPKMap
	certs        map[string]platformCert
	maxSkew      int64
}

func newWechatV3(rc routeConfig) (*wechatV3Route, error) {
	if rc.MchID == "" {
		return nil, errors.New("mchId is required")
	}
	if len(rc.APIV3Key) != 32 {
		return nil, fmt.Errorf("apiV3Key must be 32 characters, got %d", len(rc.APIV3Key))
	}
	if len(rc.PlatformCertificates) == 0 {
		return nil, errors.New("platformCertificates is empty")
	}
	v := &wechatV3Route{
		mchID:    rc.MchID,
		appID:    rc.AppID,
		apiV3Key: rc.APIV3Key,
		keys:     map[string]*rsa.PublicKey{},
		certs:    map[string]platformCert{},
		maxSkew:  300,
	}
	if rc.MaxClockSkewSeconds > 0 {
		v.maxSkew = int64(rc.MaxClockSkewSeconds)
	}
	for i, c := range rc.PlatformCertificates {
		// The key the way GoPay's client gets it (xpem), the validity from the certificate.
		key, err := xpem.DecodePublicKey([]byte(c.PEM))
		if err != nil || key == nil {
			return nil, fmt.Errorf("platformCertificates[%d]: not an RSA certificate: %v", i, err)
		}
		block, _ := pem.Decode([]byte(c.PEM))
		if block == nil || block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("platformCertificates[%d]: not a PEM certificate", i)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("platformCertificates[%d]: %w", i, err)
		}
		serial := strings.ToUpper(c.Serial)
		if own := strings.ToUpper(cert.SerialNumber.Text(16)); serial == "" {
			serial = own
		} else if strings.TrimLeft(serial, "0") != own {
			return nil, fmt.Errorf("platformCertificates[%d]: serial %s is not the certificate's %s", i, c.Serial, own)
		}
		if _, dup := v.keys[serial]; dup {
			return nil, fmt.Errorf("platformCertificates[%d]: serial %s is configured twice", i, serial)
		}
		v.keys[serial] = key
		v.certs[serial] = platformCert{notBefore: cert.NotBefore, notAfter: cert.NotAfter}
	}
	return v, nil
}

func (v *wechatV3Route) name() string { return "wechatpay-v3" }

func (v *wechatV3Route) success(w http.ResponseWriter) { w.WriteHeader(http.StatusNoContent) }

func (v *wechatV3Route) failure(w http.ResponseWriter, status int, reason string) {
	body, _ := json.Marshal(&wechatv3.V3NotifyRsp{Code: gopay.FAIL, Message: reason})
	w.Header()["Content-Type"] = []string{"application/json"}
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func (v *wechatV3Route) authenticate(r *http.Request, now time.Time) (*event, *rejection) {
	// Header checks GoPay leaves to the caller (it reads the first value of each header
	// and never Wechatpay-Signature-Type or the timestamp's age).
	for _, h := range [...]string{wechatv3.HeaderSignature, wechatv3.HeaderTimestamp, wechatv3.HeaderNonce,
		wechatv3.HeaderSerial, wechatv3.HeaderSignatureType} {
		if len(r.Header.Values(h)) > 1 {
			return nil, reject("duplicate_field")
		}
	}
	sig := r.Header.Get(wechatv3.HeaderSignature)
	if sig == "" {
		return nil, reject("missing_signature")
	}
	ts, serial := r.Header.Get(wechatv3.HeaderTimestamp), r.Header.Get(wechatv3.HeaderSerial)
	if ts == "" || serial == "" || r.Header.Get(wechatv3.HeaderNonce) == "" {
		return nil, reject("malformed")
	}
	if st := r.Header.Get(wechatv3.HeaderSignatureType); st != "" && st != v3SignatureType {
		return nil, reject("sign_type_mismatch")
	}
	if strings.HasPrefix(sig, v3SignTestProbe) {
		return nil, reject("bad_signature")
	}
	sent, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || !allDigits(ts) {
		return nil, reject("malformed")
	}
	if skew := now.Unix() - sent; skew > v.maxSkew || skew < -v.maxSkew {
		return nil, reject("stale_timestamp")
	}
	cert, known := v.certs[serial]
	if !known || now.Before(cert.notBefore) || now.After(cert.notAfter) {
		return nil, reject("unknown_serial")
	}

	notify, err := wechatv3.V3ParseNotify(r)
	if err != nil {
		return nil, readFailure(err)
	}
	if err := notify.VerifySignByPKMap(v.keys); err != nil {
		return nil, reject("bad_signature")
	}
	res := notify.Resource
	if res == nil {
		return nil, reject("malformed")
	}
	// GoPay does not check the algorithm; the nonce must be 12 bytes (go-pay/crypto aes).
	if res.Algorithm != "AEAD_AES_256_GCM" || res.Nonce == "" {
		return nil, reject("decrypt_failed")
	}
	plain, err := wechatv3.V3DecryptNotifyCipherTextToBytes(res.Ciphertext, res.Nonce, res.AssociatedData, v.apiV3Key)
	if err != nil {
		return nil, reject("decrypt_failed")
	}
	// The whole decrypted object, numbers kept as written (GoPay's typed structs would drop
	// fields they do not know).
	var resource map[string]any
	dec := json.NewDecoder(bytes.NewReader(plain))
	dec.UseNumber()
	if err := dec.Decode(&resource); err != nil || resource == nil || dec.More() {
		return nil, reject("malformed")
	}
	if !v.merchantOK(resource) {
		return nil, reject("merchant_mismatch")
	}
	return normalizeV3(notify, resource)
}

func field(m map[string]any, name string) string {
	s, _ := m[name].(string)
	return s
}

func firstField(m map[string]any, a, b string) string {
	if _, ok := m[a]; ok {
		return field(m, a)
	}
	return field(m, b)
}

func (v *wechatV3Route) merchantOK(resource map[string]any) bool {
	if firstField(resource, "mchid", "sp_mchid") != v.mchID {
		return false
	}
	return v.appID == "" || firstField(resource, "appid", "sp_appid") == v.appID
}

func normalizeV3(n *wechatv3.V3NotifyReq, resource map[string]any) (*event, *rejection) {
	mchID := orDefault(field(resource, "mchid"), field(resource, "sp_mchid"))
	amountOf := func(name string) (*amount, bool) {
		raw, present := resource["amount"]
		if !present {
			return nil, true
		}
		obj, _ := raw.(map[string]any)
		num, _ := obj[name].(json.Number)
		value, err := num.Int64()
		if err != nil || value < 0 {
			return nil, false
		}
		return &amount{Value: value, Original: strconv.FormatInt(value, 10),
			Currency: orDefault(field(obj, "currency"), "CNY")}, true
	}
	ev := &event{}
	var ok bool
	switch {
	case strings.HasPrefix(n.EventType, "TRANSACTION."):
		state := field(resource, "trade_state")
		switch state {
		case "":
			return nil, reject("malformed")
		case "SUCCESS":
			ev.Type = "payment.succeeded"
		case "CLOSED", "REVOKED":
			ev.Type = "payment.closed"
		case "PAYERROR":
			ev.Type = "payment.failed"
		case "NOTPAY", "USERPAYING":
			ev.Type = "payment.pending"
		default:
			return nil, reject("unsupported_event")
		}
		txn := orDefault(field(resource, "transaction_id"), field(resource, "out_trade_no"))
		ev.Status = state
		ev.dedupKey = "wechatpay-v3|" + mchID + "|" + txn + "|" + state
		if ev.Amount, ok = amountOf("total"); !ok {
			return nil, reject("malformed")
		}
	case strings.HasPrefix(n.EventType, "REFUND."):
		state := field(resource, "refund_status")
		switch state {
		case "":
			return nil, reject("malformed")
		case "SUCCESS":
			ev.Type = "refund.succeeded"
		case "ABNORMAL":
			ev.Type = "refund.abnormal"
		case "CLOSED":
			ev.Type = "refund.closed"
		default:
			return nil, reject("unsupported_event")
		}
		refundID := field(resource, "refund_id")
		if refundID == "" {
			return nil, reject("malformed")
		}
		ev.Status = state
		ev.dedupKey = "wechatpay-v3|" + mchID + "|refund|" + refundID + "|" + state
		if ev.Amount, ok = amountOf("refund"); !ok {
			return nil, reject("malformed")
		}
		ev.RefundID, ev.PlatformRefundID = field(resource, "out_refund_no"), refundID
	default:
		return nil, reject("unsupported_event")
	}
	ev.OrderID = field(resource, "out_trade_no")
	ev.TransactionID = field(resource, "transaction_id")
	ev.OccurredAt = orDefault(field(resource, "success_time"), n.CreateTime)
	// The envelope without the ciphertext, from GoPay's V3NotifyReq.
	envelope := map[string]any{
		"id":            n.Id,
		"create_time":   n.CreateTime,
		"event_type":    n.EventType,
		"summary":       n.Summary,
		"resource_type": n.ResourceType,
	}
	res := map[string]any{
		"algorithm":       n.Resource.Algorithm,
		"associated_data": n.Resource.AssociatedData,
		"nonce":           n.Resource.Nonce,
	}
	if n.Resource.OriginalType != "" {
		res["original_type"] = n.Resource.OriginalType
	}
	envelope["resource"] = res
	ev.Data = map[string]any{"notification": envelope, "resource": resource}
	return ev, nil
}

// ---------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------

func main() {
	configPath := flag.String("config", "", "the peer's JSON configuration file")
	flag.Parse()
	if *configPath == "" {
		fmt.Fprintln(os.Stderr, "usage: gopay-peer -config FILE")
		os.Exit(2)
	}
	if err := run(*configPath); err != nil {
		fmt.Fprintln(os.Stderr, "gopay-peer:", err)
		os.Exit(1)
	}
}

func run(configPath string) error {
	cfg, err := loadConfig(configPath)
	if err != nil {
		return err
	}
	handler, err := newHandler(cfg)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	delivery := deliveryTimeout(cfg)
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10*time.Second + delivery,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	fmt.Fprintf(os.Stderr, "gopay-peer listening on %s\n", ln.Addr())
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	// Drain requests in flight, then stop.
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second+delivery)
	defer cancel()
	return srv.Shutdown(shutdownCtx)
}
