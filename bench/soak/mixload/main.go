// mixload: the soak's load client. A closed loop of -c workers, each owning
// keep-alive connections through an HTTP proxy (CONNECT, TLS verified against
// -cacert), each request drawn from a fixed mix (chat POSTs, small GETs, SSE
// streams of three lengths, 1 MiB bodies, and a flaky host that answers 502 and
// 429 on purpose). Every -interval it prints one JSON line for that window:
// requests, ok, expected errors (the scripted 502/429), unexpected errors with
// their reasons, latency p50/p99. The last line has "final": true and totals.
// Stdlib only (Go >= 1.19), so it builds offline.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"sync"
	"time"
)

type kind struct {
	name   string
	weight int
	method string
	host   string // "api" or "flaky"
	path   string
	expect int    // the status this request must get
	check  string // "", "sse" (must end with [DONE]) or "mib" (exactly 1 MiB)
}

// Weights per 1000 requests.
var mix = []kind{
	{"chat", 400, "POST", "api", "/v1/chat/completions", 200, ""},
	{"small", 280, "GET", "api", "/small", 200, ""},
	{"sse_short", 90, "POST", "api", "/v1/stream/short", 200, "sse"},
	{"sse_medium", 60, "POST", "api", "/v1/stream/medium", 200, "sse"},
	{"sse_long", 20, "POST", "api", "/v1/stream/long", 200, "sse"},
	{"big", 5, "GET", "api", "/big", 200, "mib"},
	{"flaky_ok", 60, "GET", "flaky", "/ok", 200, ""},
	{"flaky_502", 40, "GET", "flaky", "/fail/502", 502, ""},
	{"flaky_429", 45, "GET", "flaky", "/fail/429", 429, ""},
}

const chatBody = `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"soak test: say hello"}],"max_tokens":64}`
const streamBody = `{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"soak test: stream"}],"max_tokens":256}`

type window struct {
	requests   int64
	ok         int64
	expected   int64 // scripted upstream errors answered as scripted
	unexpected map[string]int64
	lats       []time.Duration
	kinds      map[string]int64
}

func newWindow() *window { return &window{unexpected: map[string]int64{}, kinds: map[string]int64{}} }

func (w *window) add(k *kind, lat time.Duration, status int, problem string) {
	w.requests++
	w.kinds[k.name]++
	if problem != "" {
		w.unexpected[k.name+": "+problem]++
		return
	}
	w.lats = append(w.lats, lat)
	if status >= 200 && status < 300 {
		w.ok++
	} else {
		w.expected++
	}
}

func pct(lats []time.Duration, q float64) float64 {
	if len(lats) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(lats)))) - 1
	if i < 0 {
		i = 0
	}
	return float64(lats[i].Microseconds()) / 1000
}

func (w *window) line(t float64, final bool) map[string]interface{} {
	sort.Slice(w.lats, func(i, j int) bool { return w.lats[i] < w.lats[j] })
	var n int64
	for _, c := range w.unexpected {
		n += c
	}
	return map[string]interface{}{
		"t": t, "final": final, "requests": w.requests, "ok": w.ok, "expected_errors": w.expected,
		"unexpected_errors": n, "unexpected": w.unexpected, "kinds": w.kinds,
		"p50_ms": pct(w.lats, 0.50), "p99_ms": pct(w.lats, 0.99),
	}
}

func main() {
	proxy := flag.String("proxy", "", "HTTP proxy URL (required)")
	cacert := flag.String("cacert", "", "PEM file of the CA to trust (the proxy's)")
	api := flag.String("api", "api.soak.test", "host of the main provider")
	flaky := flag.String("flaky", "flaky.soak.test", "host of the provider that fails on purpose")
	conc := flag.Int("c", 64, "workers")
	dur := flag.Duration("d", time.Minute, "stop starting requests after this long")
	interval := flag.Duration("interval", 10*time.Second, "print a window line this often")
	callers := flag.Int("callers", 8, "distinct x-sidekey-caller values (per-caller limits)")
	timeout := flag.Duration("timeout", 120*time.Second, "per-request timeout")
	seed := flag.Int64("seed", 1, "random seed for the mix")
	flag.Parse()
	pu, err := url.Parse(*proxy)
	if err != nil || pu.Host == "" {
		fail(fmt.Errorf("bad -proxy %q", *proxy))
	}
	pem, err := os.ReadFile(*cacert)
	if err != nil {
		fail(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		fail(fmt.Errorf("no certificates in %s", *cacert))
	}
	hosts := map[string]string{"api": *api, "flaky": *flaky}
	var table []*kind
	for i := range mix {
		for j := 0; j < mix[i].weight; j++ {
			table = append(table, &mix[i])
		}
	}

	var mu sync.Mutex
	cur, total := newWindow(), newWindow()
	start := time.Now()
	deadline := start.Add(*dur)
	var wg sync.WaitGroup
	for i := 0; i < *conc; i++ {
		tr := &http.Transport{
			Proxy:               http.ProxyURL(pu),
			DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
			TLSClientConfig:     &tls.Config{RootCAs: pool},
			TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
			MaxIdleConnsPerHost: 1,
			MaxConnsPerHost:     1,
			DisableCompression:  true,
			TLSHandshakeTimeout: 10 * time.Second,
		}
		client := &http.Client{Transport: tr, Timeout: *timeout}
		rng := rand.New(rand.NewSource(*seed + int64(i)))
		caller := fmt.Sprintf("soak-%d", i%*callers)
		wg.Add(1)
		first := &mix[i%len(mix)] // so that even a short run draws every kind
		go func() {
			defer wg.Done()
			defer tr.CloseIdleConnections()
			for k := first; time.Now().Before(deadline); k = table[rng.Intn(len(table))] {
				lat, status, problem := do(client, k, hosts[k.host], caller)
				mu.Lock() // one lock for both: a request lands in exactly one printed window
				cur.add(k, lat, status, problem)
				total.add(k, lat, status, problem)
				mu.Unlock()
			}
		}()
	}
	enc := json.NewEncoder(os.Stdout)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	ticker := time.NewTicker(*interval)
	defer ticker.Stop()
	for {
		select {
		case <-ticker.C:
			mu.Lock()
			w := cur
			cur = newWindow()
			mu.Unlock()
			_ = enc.Encode(w.line(time.Since(start).Seconds(), false))
			continue
		case <-done:
		}
		break
	}
	_ = enc.Encode(cur.line(time.Since(start).Seconds(), false)) // the last partial window
	_ = enc.Encode(total.line(time.Since(start).Seconds(), true))
}

func do(client *http.Client, k *kind, host, caller string) (time.Duration, int, string) {
	var body io.Reader
	switch {
	case k.method == "POST" && k.check == "sse":
		body = bytes.NewReader([]byte(streamBody))
	case k.method == "POST":
		body = bytes.NewReader([]byte(chatBody))
	}
	req, err := http.NewRequestWithContext(context.Background(), k.method, "https://"+host+k.path, body)
	if err != nil {
		fail(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("x-sidekey-caller", caller)
	t0 := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, 0, short(err.Error())
	}
	data, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	lat := time.Since(t0)
	if err != nil {
		return lat, resp.StatusCode, "body: " + short(err.Error())
	}
	if resp.StatusCode != k.expect {
		return lat, resp.StatusCode, fmt.Sprintf("status %d: %s", resp.StatusCode, short(string(data)))
	}
	switch k.check {
	case "sse":
		if !bytes.HasSuffix(data, []byte("data: [DONE]\n\n")) {
			return lat, resp.StatusCode, fmt.Sprintf("stream cut after %d bytes", len(data))
		}
	case "mib":
		if len(data) != 1<<20 {
			return lat, resp.StatusCode, fmt.Sprintf("body of %d bytes, not 1 MiB", len(data))
		}
	}
	return lat, resp.StatusCode, ""
}

func short(s string) string {
	if len(s) > 120 {
		return s[:120]
	}
	return s
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "mixload:", err)
	os.Exit(2)
}
