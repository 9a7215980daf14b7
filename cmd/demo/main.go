// Command demo is the project's main job: it runs the reference bridge against the local stack
// (scripts/stack.sh) the way a bridge admin would set it up, shows an encrypted message going
// from a Matrix user to the webhook network and an answer coming back, decrypted by the user, and
// then wedges the Olm session between the bridge and the user's device and shows unwedge heal it.
//
// Run it through scripts/run.sh, which brings up Postgres and Synapse first.
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	_ "github.com/lib/pq"
	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/unwedge/unwedge/internal/harness"
	"github.com/unwedge/unwedge/internal/testclient"
	"github.com/unwedge/unwedge/internal/testenv"
	"github.com/unwedge/unwedge/webhook"
)

func main() {
	dir := flag.String("dir", "/var/cache/unwedge/demo", "working directory for the bridge's config, registration and log")
	keep := flag.Bool("keep-running", false, "keep the bridge running after the exchange, until Ctrl-C")
	flag.Parse()
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := run(ctx, *dir, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

func say(format string, args ...any) {
	fmt.Printf("%s  "+format+"\n", append([]any{time.Now().Format("15:04:05.000")}, args...)...)
}

func run(ctx context.Context, dir string, keep bool) error {
	env, err := testenv.Load()
	if err != nil {
		return fmt.Errorf("local stack not found (run scripts/run.sh): %w", err)
	}
	root, err := harness.ModuleRoot()
	if err != nil {
		return err
	}
	if err = os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	// Every run starts from an empty bridge database.
	if err = env.DropDatabase(ctx, "unwedge_demo"); err != nil {
		return err
	}
	dbURI, err := env.CreateDatabase(ctx, "unwedge_demo")
	if err != nil {
		return err
	}

	// 1. Config and registration, as a bridge admin makes them. A registration from an earlier run
	// is reused, so Synapse does not have to restart.
	slot := &harness.Slot{ID: "unwedge-demo", Port: 29499, BotLocalpart: "demobot", UsernameTemplate: "demo_{{.}}"}
	regPath := filepath.Join(dir, "registration.yaml")
	reg, regErr := appservice.LoadRegistration(regPath)
	if regErr == nil {
		slot.ASToken, slot.HSToken = reg.AppToken, reg.ServerToken
	}
	br, err := harness.NewBridge(harness.BridgeOptions{
		Binary:        filepath.Join(root, "unwedge-bridge"),
		Dir:           dir,
		HomeserverURL: env.HomeserverURL,
		Domain:        env.Domain,
		Slot:          slot,
		DatabaseType:  "postgres",
		DatabaseURI:   dbURI,
		// The echo service below listens on 127.0.0.1, a private address that webhook URLs may
		// not point at by default.
		Config: map[string]any{"network.delivery.allow_private_addresses": true},
	})
	if err != nil {
		return err
	}
	if regErr != nil {
		if err = br.GenerateRegistration(ctx, regPath); err != nil {
			return err
		}
		say("wrote %s and %s with ./unwedge-bridge -g", br.ConfigPath, regPath)
	} else {
		say("wrote %s, reusing %s", br.ConfigPath, regPath)
	}
	register := exec.CommandContext(ctx, "bash", filepath.Join(root, "scripts/synapse.sh"), "start", regPath)
	register.Stdout, register.Stderr = os.Stderr, os.Stderr
	if err = register.Run(); err != nil {
		return fmt.Errorf("failed to register the bridge with Synapse: %w", err)
	}
	say("registered the appservice with Synapse at %s", env.HomeserverURL)

	// 2. The bridge, with end-to-bridge encryption on. Its database is new, so it makes a new bot
	// device: the one of the last run is deleted first.
	if _, err = br.ClearBotDevices(ctx); err != nil {
		return err
	}
	if err = br.Start(ctx); err != nil {
		return err
	}
	defer func() {
		_ = br.Stop()
		say("bridge stopped; its log is %s", br.LogPath)
	}()
	say("bridge running: bot %s, encryption on, Postgres database, log %s", br.BotMXID, br.LogPath)

	// 3. A remote system: an echo service behind an outgoing webhook.
	echo, err := startEchoService(ctx)
	if err != nil {
		return err
	}
	defer echo.Close()

	// 4. A Matrix user with an end-to-end-encrypted client (the stand-in for Element).
	user, err := testclient.New(ctx, testclient.Options{
		HomeserverURL: env.HomeserverURL,
		Username:      testenv.UniqueName("alice"),
		Password:      "demo password 1719",
		DataDir:       filepath.Join(dir, "client"),
		Log:           zerolog.Nop(),
	})
	if err != nil {
		return err
	}
	defer user.Close()
	say("Matrix user %s logged in with device %s", user.UserID(), user.DeviceID())

	remote, err := br.Login(ctx, user.UserID(), "echo", echo.URL)
	if err != nil {
		return err
	}
	echo.client = remote
	say("logged %s in to the webhook network as account %q (outgoing webhook %s)", user.UserID(), "echo", echo.URL)
	chat, err := remote.CreateChat(ctx, "lobby", "Lobby")
	if err != nil {
		return err
	}
	if err = user.WaitForJoin(ctx, chat.RoomID); err != nil {
		return err
	}
	say("portal for chat %q is %s; the user joined it", "lobby", chat.RoomID)

	// 5. Matrix -> webhook network -> Matrix.
	if err = roundTrip(ctx, user, echo, chat.RoomID, "Hello from Matrix, end-to-bridge encrypted"); err != nil {
		return err
	}
	say("round trip complete")

	// 6. A wedge: the bridge loses its Olm session with the user's device (a lost database row),
	// and the user's next room key has to cross the broken session.
	if err = br.Stop(); err != nil {
		return err
	}
	if err = execSQL(ctx, dbURI, "DELETE FROM crypto_olm_session WHERE sender_key = $1", user.IdentityKey()); err != nil {
		return err
	}
	if err = br.Start(ctx); err != nil {
		return err
	}
	say("wedged: deleted the bridge's Olm session with device %s and restarted the bridge", user.DeviceID())
	if err = user.RotateRoomKey(ctx, chat.RoomID); err != nil {
		return err
	}
	if err = roundTrip(ctx, user, echo, chat.RoomID, "Sent while the Olm session was wedged"); err != nil {
		return err
	}
	heal, err := lastHeal(ctx, dbURI)
	if err != nil {
		return err
	}
	say("unwedge healed it: %s", heal)
	if keep {
		say("bridge keeps running at %s; Ctrl-C to stop", br.URL)
		<-ctx.Done()
	}
	return nil
}

// roundTrip sends text from the user, waits for the webhook side to get it and for the echo to
// come back decrypted.
func roundTrip(ctx context.Context, user *testclient.Client, echo *echoService, room id.RoomID, text string) error {
	sent := time.Now()
	evtID, err := user.SendText(ctx, room, text)
	if err != nil {
		return err
	}
	say("user sent %q as %s (m.room.encrypted)", text, evtID)
	got, err := echo.wait(ctx)
	if err != nil {
		return err
	}
	say("webhook network received %q from %s after %s", got.Text, got.Sender, time.Since(sent).Round(time.Millisecond))
	reply, err := user.WaitForMessage(ctx, room, func(evt *event.Event) bool {
		return evt.Content.AsMessage().Body == "echo: "+text
	})
	if err != nil {
		return err
	}
	say("user decrypted %q from %s after %s (encrypted: %t)", reply.Content.AsMessage().Body, reply.Sender,
		time.Since(sent).Round(time.Millisecond), reply.Mautrix.WasEncrypted)
	if !reply.Mautrix.WasEncrypted {
		return fmt.Errorf("the reply was not encrypted")
	}
	return nil
}

func execSQL(ctx context.Context, uri, query string, args ...any) error {
	db, err := sql.Open("postgres", uri)
	if err != nil {
		return err
	}
	defer db.Close()
	if _, err = db.ExecContext(ctx, query, args...); err != nil {
		return fmt.Errorf("failed to run %q: %w", query, err)
	}
	return nil
}

// lastHeal describes the newest heal in the bridge's unwedge ledger.
func lastHeal(ctx context.Context, uri string) (string, error) {
	db, err := sql.Open("postgres", uri)
	if err != nil {
		return "", err
	}
	defer db.Close()
	var class, outcome, sessionID, deviceID string
	var started, finished int64
	err = db.QueryRowContext(ctx, `SELECT class, outcome, session_id, device_id, started_at, finished_at
		FROM unwedge_heal ORDER BY id DESC LIMIT 1`).Scan(&class, &outcome, &sessionID, &deviceID, &started, &finished)
	if err != nil {
		return "", fmt.Errorf("no heal in the unwedge ledger: %w", err)
	}
	return fmt.Sprintf("ledger says class=%s outcome=%s device=%s new Olm session %s in %d ms", class, outcome, deviceID, sessionID, finished-started), nil
}

// echoService is the remote side: it receives Matrix messages on its webhook and answers each
// through the webhook API.
type echoService struct {
	URL      string
	client   *webhook.RemoteClient
	server   *http.Server
	received chan webhook.OutgoingMessage
}

func startEchoService(ctx context.Context) (*echoService, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	es := &echoService{URL: "http://" + ln.Addr().String() + "/hook", received: make(chan webhook.OutgoingMessage, 16)}
	es.server = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var msg webhook.OutgoingMessage
		if err := json.NewDecoder(r.Body).Decode(&msg); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusNoContent)
		es.received <- msg
		go es.answer(ctx, msg)
	})}
	go func() { _ = es.server.Serve(ln) }()
	return es, nil
}

func (es *echoService) answer(ctx context.Context, msg webhook.OutgoingMessage) {
	_, err := es.client.PostMessage(ctx, &webhook.PostMessageRequest{
		ChatID: msg.ChatID, Sender: "echo-bot", SenderName: "Echo bot", Text: "echo: " + msg.Text,
	})
	if err != nil {
		say("echo service failed to answer: %v", err)
	}
}

func (es *echoService) wait(ctx context.Context) (webhook.OutgoingMessage, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	select {
	case msg := <-es.received:
		return msg, nil
	case <-ctx.Done():
		return webhook.OutgoingMessage{}, fmt.Errorf("webhook received nothing: %w", ctx.Err())
	}
}

func (es *echoService) Close() {
	_ = es.server.Close()
}
