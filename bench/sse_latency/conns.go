package main

// conns mode: one request per new connection (no keep-alive), as curl-per-call clients do,
// to measure the cost of a new client connection (CONNECT + TLS handshake to the proxy) and,
// with -hosts, of a new host (the proxy mints a leaf certificate). -resume keeps a TLS session
// cache per worker, so a proxy that issues session tickets can resume instead of a full handshake.

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

func conns(target, proxy, cacert string, conc int, dur time.Duration, resume bool, hosts int, keep bool) {
	pool := loadPool(cacert)
	base, err := url.Parse(target)
	must(err)
	var proxyURL *url.URL
	if proxy != "" {
		proxyURL, err = url.Parse(proxy)
		must(err)
	}
	var next, ok, resumed, failed int64
	lats := make([][]time.Duration, conc)
	errs := sync.Map{}
	deadline := time.Now().Add(dur)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			tlsConf := &tls.Config{RootCAs: pool}
			if resume {
				tlsConf.ClientSessionCache = tls.NewLRUClientSessionCache(64)
			}
			tr := &http.Transport{TLSClientConfig: tlsConf, DisableKeepAlives: !keep, DisableCompression: true, MaxConnsPerHost: 1}
			if proxyURL != nil {
				tr.Proxy = http.ProxyURL(proxyURL)
			}
			cl := &http.Client{Transport: tr, Timeout: 30 * time.Second}
			for time.Now().Before(deadline) {
				n := atomic.AddInt64(&next, 1)
				u := *base
				if hosts > 0 {
					u.Host = fmt.Sprintf("h%d.bench.test", n)
				}
				t0 := time.Now()
				resp, err := cl.Get(u.String())
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					atomic.AddInt64(&failed, 1)
					errs.Store(err.Error(), true)
					continue
				}
				lats[w] = append(lats[w], time.Since(t0))
				atomic.AddInt64(&ok, 1)
				if resp.TLS != nil && resp.TLS.DidResume {
					atomic.AddInt64(&resumed, 1)
				}
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	var some []string
	errs.Range(func(k, _ any) bool {
		if len(some) < 3 {
			some = append(some, k.(string))
		}
		return true
	})
	out := map[string]any{
		"ok": ok, "failed": failed, "resumed": resumed, "rps": float64(ok) / elapsed,
		"seconds": elapsed, "latency_us": pct(all), "errors": some,
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}
