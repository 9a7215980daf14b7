package unwedge

// This file keeps the homeserver's answers about other users' keys to what the bridge asked. A
// homeserver relays other servers' answers to /keys/claim and /keys/query and filters them by
// user only (Synapse), so a hostile server can answer for devices the bridge never asked about.
// mautrix-go (v0.32.0, createOutboundSessions) looks a claimed key's device up in what it asked
// for and dereferences it without a check: one extra device in a claim answer crashes the
// process. Every answer is cut down here, before mautrix-go parses it, to the users and devices
// that were asked, and to one key of the asked algorithm per device.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"
)

// Endpoint names a key endpoint whose answers are filtered.
type Endpoint string

const (
	EndpointClaim Endpoint = "keys_claim"
	EndpointQuery Endpoint = "keys_query"
)

// answerGuard is the machine client's HTTP transport: it passes every request on, and filters the
// answers of /keys/claim and /keys/query to what the request asked.
// Relies on crypto/encryptolm.go createOutboundSessions dereferencing the claim answer unchecked (pinned in internal/upstream).
type answerGuard struct {
	next http.RoundTripper
	log  zerolog.Logger
	// dropped counts the entries taken out of answers, by endpoint.
	claimDropped, queryDropped atomic.Int64
}

// guardAnswers puts an answerGuard in front of the client's transport (once: a client already
// guarded keeps its guard) and returns it.
func guardAnswers(client *mautrix.Client, log zerolog.Logger) *answerGuard {
	httpClient := client.Client
	if httpClient == nil {
		httpClient = http.DefaultClient
	}
	if guard, ok := httpClient.Transport.(*answerGuard); ok {
		return guard
	}
	next := httpClient.Transport
	if next == nil {
		next = http.DefaultTransport
	}
	guard := &answerGuard{next: next, log: log}
	// A copy: the http.Client may be shared with other clients (the appservice's), which keep
	// their transport.
	guarded := *httpClient
	guarded.Transport = guard
	client.Client = &guarded
	return guard
}

// Dropped returns how many entries were taken out of the answers of each endpoint.
func (g *answerGuard) Dropped() map[Endpoint]int64 {
	return map[Endpoint]int64{EndpointClaim: g.claimDropped.Load(), EndpointQuery: g.queryDropped.Load()}
}

func (g *answerGuard) RoundTrip(req *http.Request) (*http.Response, error) {
	endpoint := keyEndpoint(req)
	if endpoint == "" {
		return g.next.RoundTrip(req)
	}
	asked, err := requestBody(req)
	if err != nil {
		return nil, fmt.Errorf("failed to read the %s request to filter its answer: %w", endpoint, err)
	}
	resp, err := g.next.RoundTrip(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		return resp, err
	}
	answer, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("failed to read the %s answer: %w", endpoint, err)
	}
	if endpoint == EndpointClaim {
		noteClaimFailures(req.Context(), answer)
	}
	filtered, dropped := filterAnswer(endpoint, asked, answer)
	if len(dropped) > 0 {
		counter := &g.claimDropped
		if endpoint == EndpointQuery {
			counter = &g.queryDropped
		}
		counter.Add(int64(len(dropped)))
		g.log.Warn().Str("endpoint", string(endpoint)).Strs("dropped", firstN(dropped, 20)).Int("count", len(dropped)).
			Msg("Dropped what the homeserver answered but the bridge did not ask for")
	}
	resp.Body = io.NopCloser(bytes.NewReader(filtered))
	resp.ContentLength = int64(len(filtered))
	resp.Header.Del("Content-Length")
	return resp, nil
}

// keyEndpoint names the key endpoint a request goes to, or "" for any other request.
func keyEndpoint(req *http.Request) Endpoint {
	if req.Method != http.MethodPost {
		return ""
	}
	switch {
	case strings.HasSuffix(req.URL.Path, "/keys/claim"):
		return EndpointClaim
	case strings.HasSuffix(req.URL.Path, "/keys/query"):
		return EndpointQuery
	}
	return ""
}

// requestBody reads the request's body and leaves it readable for the transport.
func requestBody(req *http.Request) ([]byte, error) {
	if req.GetBody != nil {
		body, err := req.GetBody()
		if err != nil {
			return nil, err
		}
		defer body.Close()
		return io.ReadAll(body)
	}
	if req.Body == nil {
		return nil, nil
	}
	data, err := io.ReadAll(req.Body)
	_ = req.Body.Close()
	req.Body = io.NopCloser(bytes.NewReader(data))
	return data, err
}

// filterAnswer cuts an answer of the endpoint down to what the request asked, and names what it
// dropped. An answer that is no JSON at all is passed on as it is (the client's parser refuses
// it); JSON that is no object (null, a list) is answered as {}: mautrix-go v0.32.0 reads a null
// claim answer as no answer and dereferences it. A field of the wrong shape is dropped whole.
func filterAnswer(endpoint Endpoint, asked, answer []byte) ([]byte, []string) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(answer, &fields); err != nil || fields == nil {
		if !json.Valid(answer) {
			return answer, nil
		}
		return []byte("{}"), []string{"the whole answer (no JSON object)"}
	}
	var dropped []string
	switch endpoint {
	case EndpointClaim:
		var req mautrix.ReqClaimKeys
		_ = json.Unmarshal(asked, &req)
		dropped = filterField(fields, "one_time_keys", func(raw json.RawMessage) (any, []string, error) {
			return filterClaimed(req.OneTimeKeys, raw)
		})
	case EndpointQuery:
		var req mautrix.ReqQueryKeys
		_ = json.Unmarshal(asked, &req)
		dropped = filterField(fields, "device_keys", func(raw json.RawMessage) (any, []string, error) {
			return filterDeviceKeys(req.DeviceKeys, raw)
		})
		for _, name := range []string{"master_keys", "self_signing_keys", "user_signing_keys"} {
			dropped = append(dropped, filterField(fields, name, func(raw json.RawMessage) (any, []string, error) {
				return filterUserKeys(req.DeviceKeys, name, raw)
			})...)
		}
	}
	if len(dropped) == 0 {
		return answer, nil
	}
	out, err := json.Marshal(fields)
	if err != nil {
		// Every field is valid JSON already; this cannot fail. Pass nothing rather than the unfiltered answer.
		return []byte("{}"), append(dropped, "the whole answer: "+err.Error())
	}
	return out, dropped
}

// filterField replaces fields[name] by what filter keeps of it; a field filter cannot read is
// dropped whole.
func filterField(fields map[string]json.RawMessage, name string, filter func(json.RawMessage) (any, []string, error)) []string {
	raw, ok := fields[name]
	if !ok || string(raw) == "null" {
		return nil
	}
	kept, dropped, err := filter(raw)
	if err != nil {
		delete(fields, name)
		return []string{fmt.Sprintf("%s (malformed: %v)", name, err)}
	}
	if len(dropped) > 0 {
		fields[name], _ = json.Marshal(kept)
	}
	return dropped
}

// filterClaimed keeps, of a claim answer's one_time_keys, one key of the asked algorithm for each
// asked device (the one with the lowest key ID, so the choice does not depend on map order).
func filterClaimed(asked mautrix.OneTimeKeysRequest, raw json.RawMessage) (any, []string, error) {
	var answer map[id.UserID]map[id.DeviceID]map[id.KeyID]json.RawMessage
	if err := json.Unmarshal(raw, &answer); err != nil {
		return nil, nil, err
	}
	var dropped []string
	kept := make(map[id.UserID]map[id.DeviceID]map[id.KeyID]json.RawMessage, len(answer))
	for userID, devices := range answer {
		for deviceID, keys := range devices {
			alg, ok := asked[userID][deviceID]
			if !ok {
				dropped = append(dropped, fmt.Sprintf("one_time_keys %s %s (not asked)", userID, deviceID))
				continue
			}
			var chosen id.KeyID
			for keyID, key := range keys {
				if keyAlg, _ := keyID.Parse(); keyAlg != alg || !isObject(key) {
					continue
				}
				if chosen == "" || keyID < chosen {
					chosen = keyID
				}
			}
			n := len(keys)
			if chosen != "" {
				n-- // the one kept
			}
			if n > 0 {
				dropped = append(dropped, fmt.Sprintf("one_time_keys %s %s (%d of %d keys)", userID, deviceID, n, len(keys)))
			}
			if chosen == "" {
				continue
			}
			if kept[userID] == nil {
				kept[userID] = map[id.DeviceID]map[id.KeyID]json.RawMessage{}
			}
			kept[userID][deviceID] = map[id.KeyID]json.RawMessage{chosen: keys[chosen]}
		}
	}
	return kept, dropped, nil
}

// filterDeviceKeys keeps, of a query answer's device_keys, the asked users' devices (all of them
// when the request listed none, as the spec says) that are JSON objects.
func filterDeviceKeys(asked mautrix.DeviceKeysRequest, raw json.RawMessage) (any, []string, error) {
	var answer map[id.UserID]map[id.DeviceID]json.RawMessage
	if err := json.Unmarshal(raw, &answer); err != nil {
		return nil, nil, err
	}
	var dropped []string
	kept := make(map[id.UserID]map[id.DeviceID]json.RawMessage, len(answer))
	for userID, devices := range answer {
		list, ok := asked[userID]
		if !ok {
			dropped = append(dropped, fmt.Sprintf("device_keys %s (not asked)", userID))
			continue
		}
		kept[userID] = make(map[id.DeviceID]json.RawMessage, len(devices))
		for deviceID, keys := range devices {
			switch {
			case len(list) > 0 && !slices.Contains(list, deviceID):
				dropped = append(dropped, fmt.Sprintf("device_keys %s %s (not asked)", userID, deviceID))
			case !isObject(keys):
				dropped = append(dropped, fmt.Sprintf("device_keys %s %s (not an object)", userID, deviceID))
			default:
				kept[userID][deviceID] = keys
			}
		}
	}
	return kept, dropped, nil
}

// filterUserKeys keeps, of a query answer's cross-signing keys, those of asked users.
func filterUserKeys(asked mautrix.DeviceKeysRequest, name string, raw json.RawMessage) (any, []string, error) {
	var answer map[id.UserID]json.RawMessage
	if err := json.Unmarshal(raw, &answer); err != nil {
		return nil, nil, err
	}
	var dropped []string
	kept := make(map[id.UserID]json.RawMessage, len(answer))
	for userID, keys := range answer {
		if _, ok := asked[userID]; !ok || !isObject(keys) {
			dropped = append(dropped, fmt.Sprintf("%s %s", name, userID))
			continue
		}
		kept[userID] = keys
	}
	return kept, dropped, nil
}

func isObject(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 0 && raw[0] == '{'
}

func firstN(list []string, n int) []string {
	return list[:min(n, len(list))]
}

// claimFailures collects the servers that a /keys/claim answer's failures name: the homeserver
// could not reach them, so their users' devices got no key, and it is no fault of the devices.
// mautrix-go's EncryptToDevices (crypto/encryptolm.go createOutboundSessions, pinned in
// internal/upstream) reads the answer's one_time_keys only, so the heal engine learns of failures
// here, where the answer passes, through the request's context (withClaimFailures).
type claimFailures struct {
	lock    sync.Mutex
	servers map[string]bool
}

type claimFailuresKey struct{}

func withClaimFailures(ctx context.Context, f *claimFailures) context.Context {
	return context.WithValue(ctx, claimFailuresKey{}, f)
}

// maxClaimFailures bounds the servers noted of one answer (a hostile homeserver can name any).
const maxClaimFailures = 1000

// noteClaimFailures notes the servers a claim answer's failures name, for the claim's heals.
func noteClaimFailures(ctx context.Context, answer []byte) {
	f, ok := ctx.Value(claimFailuresKey{}).(*claimFailures)
	if !ok {
		return
	}
	var parsed struct {
		Failures map[string]json.RawMessage `json:"failures"`
	}
	if json.Unmarshal(answer, &parsed) != nil || len(parsed.Failures) == 0 {
		return
	}
	f.lock.Lock()
	defer f.lock.Unlock()
	if f.servers == nil {
		f.servers = make(map[string]bool)
	}
	for server := range parsed.Failures {
		if len(f.servers) >= maxClaimFailures {
			break
		}
		f.servers[server] = true
	}
}

// failed reports whether the latest claim answer named the server among its failures.
func (f *claimFailures) failed(server string) bool {
	f.lock.Lock()
	defer f.lock.Unlock()
	return f.servers[server]
}

// reset forgets the servers noted, before the next claim.
func (f *claimFailures) reset() {
	f.lock.Lock()
	defer f.lock.Unlock()
	f.servers = nil
}
