"""Write the OperaMail recording that fakeserver.py embeds (OPERAMAIL_RECORDING) from readable text.

The seed (a 2002 web page) shows the OperaMail session with the messages cut short; the full
messages are rebuilt here in readable Japanese, encoded as the server sent them (ISO-2022-JP),
served by fakeserver with the OperaMail voice, and recorded in fakeserver's transcript format. The
recording, not this script, is what the preset and the replay serve; test_replay.py checks that
this script still produces it byte for byte, so the readable text and the recording cannot drift.

    python3 tools/operamail_recording.py > /tmp/operamail.txt
"""
# SPDX-License-Identifier: MIT

from __future__ import annotations

import datetime
import socket
import sys
from pathlib import Path
from typing import Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fakeserver  # noqa: E402 (the repository's copy, found through the path above)

# The seed's two messages come from a web page that dropped white space. Three repairs, each the
# least that makes the messages valid RFC 5322 again:
# - folded header lines lost their leading white space: one space is restored on the lone ">" of
#   message 1's Message-ID, on its three Subject continuation lines, and on the "+?=" of message
#   2's Subject (a fold inside an encoded word: the real message was like that, clients must cope);
# - the blank line between header and body is restored;
# - the page shows four body lines of message 2 for "TOP 2 5", so it dropped one blank body line
#   as well. We take it to be the fifth line (a blank line after the ad's banner), which keeps the
#   seed's four lines at the start of the body; TOP 2 5 therefore returns them plus that blank line.
# Message 1's "(以下省略)" is the page author's "(rest omitted)", not message content.
# Message 2's Subject is base64 of Shift_JIS bytes labelled ISO-2022-JP: kept as the seed shows it.

_ATMARKIT_HEADER = (
    "Received: from www2.csc.ne.jp [203.141.151.50] (atmarkit-news-admin@atmarkit.co.jp) by"
    " operamail.com; Sun, 20 Jan 2002 21:51:20 -0500",
    "Received: from atmarkit-www.atmarkit.co.jp (atmarkit-www.atmarkit.co.jp [211.4.251.193])",
    "    by www2.csc.ne.jp (8.11.1/8.11.1) with ESMTP id g0L2ou432332",
    "    for <muller@csc.jp>; Mon, 21 Jan 2002 11:50:56 +0900 (JST)",
    "    (envelope-from atmarkit-news-admin@atmarkit.co.jp)",
    "Received: from atmarkit-www.atmarkit.co.jp (IDENT:root@atmarkit-www.atmarkit.co.jp"
    " [211.4.251.193])",
    "    by atmarkit-www.atmarkit.co.jp (8.9.3/8.9.3) with ESMTP id HAA21689",
    "    for <muller@csc.jp>; Mon, 21 Jan 2002 07:26:05 +0900",
    "Message-ID: <-2034930363.1011565565483.JavaMail.root@atmarkit-www.atmarkit.co.jp",
    " >",
    "Date: Mon, 21 Jan 2002 07:26:05 +0900 (JST)",
    "From: membership@atmarkit.co.jp",
    "To: muller@csc.jp",
    "Subject: =?iso-2022-jp?B?GyRCIXcbKEJJVBskQj83Q2VCLkpzGyhCIC0gMjA=?=",
    " =?iso-2022-jp?B?MDIvMS8xORskQiEhGyhCMUZEIA==?=",
    " =?iso-2022-jp?B?TGludXgbJEIkRzpuJGs5YjUhRz0laxsoQg==?=",
    " =?iso-2022-jp?B?GyRCITwlPxsoQiAbJEIhTiUkJXMlOSVIITwla0pUIU8bKEI=?=",
    "Mime-Version: 1.0",
    "Content-Type: text/plain; charset=iso-2022-jp",
    "Content-Transfer-Encoding: 7bit",
)
_ATMARKIT_START = (
    "┏━┳━┳━┓",
    "┃@┃I┃T┃ 新着速報 (2002/1/19)",
    "┗━┻━┻━┛",
    "@ITの新着記事をお届けします。",
    "",
)
_ATMARKIT_SECTIONS = (
    (
        "━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━",
        "■Linux Square",
        "  1FD Linuxで作る高機能ルータ［インストール編］",
        "  フロッピー1枚で起動するLinuxで、使わなくなったPCをルータとして",
        "  よみがえらせます。今回はインストールと基本設定の手順を解説します。",
        "  http://www.atmarkit.co.jp/flinux/special/1fd/1fd02a.html",
        "",
    ),
    (
        "■Windows Server Insider",
        "  Windows 2000 Serverのグループポリシーを使いこなす（第3回）",
        "  クライアントのデスクトップ環境を一括して管理する方法を紹介します。",
        "  http://www.atmarkit.co.jp/fwin2k/operation/gpolicy03/gpolicy03_01.html",
        "",
    ),
    (
        "■Java Solution",
        "  サーブレットとJSPで作るWebアプリケーション入門（前編）",
        "  セッション管理の考え方と、フォームの値を安全に扱う方法を学びます。",
        "  http://www.atmarkit.co.jp/fjava/rensai/webapp01/webapp01.html",
        "",
    ),
    (
        "■Security & Trust",
        "  今さら聞けないファイアウォールの基礎",
        "  パケットフィルタリングとアプリケーションゲートウェイの違いを、",
        "  図を使って分かりやすく説明します。",
        "  http://www.atmarkit.co.jp/fsecurity/special/firewall/firewall01.html",
        "",
    ),
    (
        "■Master of IP Network",
        "  ネットワーク管理者のためのDNS再入門（第2回）",
        "  ゾーン転送の設定を見直して、不要な情報の漏えいを防ぎましょう。",
        "  http://www.atmarkit.co.jp/fnetwork/rensai/dns02/dns02.html",
        "",
    ),
    (
        "■Database Expert",
        "  PostgreSQLで始めるデータベース設計",
        "  正規化の基本から、インデックスを張る場所の選び方までを扱います。",
        "  http://www.atmarkit.co.jp/fdb/rensai/pgsql01/pgsql01.html",
        "",
    ),
    (
        "■XML & Web Services",
        "  SOAPメッセージの中身を読んでみよう",
        "  Webサービスの呼び出しで実際に流れるXMLを、一行ずつ追いかけます。",
        "  http://www.atmarkit.co.jp/fxml/rensai/soap02/soap02.html",
        "",
    ),
    (
        "■System Insider",
        "  ハードディスクの容量はどこまで増えるのか",
        "  記録密度の向上を支える技術と、今後のロードマップを展望します。",
        "  http://www.atmarkit.co.jp/fsys/zunouhoudan/hdd01/hdd01.html",
        "",
    ),
    (
        "■会議室から",
        "  「Linux Square」会議室：カーネル2.4へ移行するときの注意点は？",
        "  「Java Solution」会議室：Tomcatの文字化けを直すには",
        "  http://www.atmarkit.co.jp/bbs/",
        "",
    ),
    (
        "■Web Site Design",
        "  スタイルシートで作る、読みやすいページのレイアウト",
        "  テーブルを使わずに段組みを実現するテクニックを紹介します。",
        "  http://www.atmarkit.co.jp/fwebdesign/rensai/css02/css02.html",
        "",
    ),
    (
        "■Business Computing",
        "  中堅企業のためのIT投資、失敗しないための5つのポイント",
        "  導入前に確認しておきたい費用と効果の見積もり方を考えます。",
        "  http://www.atmarkit.co.jp/fbiz/column/invest01/invest01.html",
        "",
    ),
    (
        "━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━",
        "■今週の特集",
        "  2002年、エンジニアが押さえておきたい技術トレンド",
        "  ブロードバンドの普及、無線LAN、Webサービス、そしてセキュリティ。",
        "  各フォーラムの編集者が、今年注目すべき技術をそれぞれの視点から",
        "  予想します。あなたの予想と比べてみてください。",
        "  http://www.atmarkit.co.jp/news/special/trend2002/trend01.html",
        "",
    ),
    (
        "■イベント情報",
        "  2月7日（木）　@IT主催セミナー「Linuxサーバ構築の実際」",
        "  会場：東京・新宿　定員：100名（参加無料、事前登録制）",
        "  http://www.atmarkit.co.jp/event/",
        "",
    ),
    ("  ・今週のアクセスランキングは、トップページからご覧いただけます。", ""),
    ("  ・読者アンケートへのご協力をお願いいたします。", ""),
    ("  ・次号は1月26日に配信の予定です。", ""),
    ("■バックナンバー",),
)
_ATMARKIT_FOOTER = (
    "━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━",
    "このメールは、@IT会員の方にお送りしています。",
    "配信の停止や登録内容の変更は、以下のページで行えます。",
    "  http://www.atmarkit.co.jp/club/",
    "発行：株式会社アットマーク・アイティ",
    "Copyright (c) 2002 atmarkit.co.jp All rights reserved.",
)

_CSC_HEADER = (
    "Received: from platz.jp [210.143.104.205] (adv@csc.ne.jp) by operamail.com;"
    " Mon, 21 Jan 2002 02:45:53 -0500",
    "Received: from adv (h133-191.tokyu-net.catv.ne.jp [210.149.133.191])",
    "    by platz.jp (8.9.3/3.7Wpl201012312) with SMTP id QAA05582",
    "    for <muller@operamail.com>; Mon, 21 Jan 2002 16:44:50 +0900",
    "Date: Mon, 21 Jan 2002 16:44:50 +0900",
    "Message-Id: <200201210744.QAA05582@platz.jp>",
    "From: =?ISO-2022-JP?B?Q3liZXIgU3BhY2UgQ29tbXVuaXR5?=<adv@csc.ne.jp>",
    "To: muller@operamail.com",
    "Subject: =?ISO-2022-JP?B?gXWCYoJygmKCqYLngsyOqILmguiCyIKokm2C54K5gXY8j2+J74KildI",
    " +?=",
    "X-Mailer: Personal_ML11F",
    "Reply-To: adv@csc.ne.jp",
    "Mime-Version: 1.0",
    "Content-Type: text/plain; charset=iso-2022-jp",
)
_CSC_START = (
    "■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□",
    "Cyber Space Community <CSCからのお知らせ> powered by RAT Co.,Ltd.",
    "■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□",
    "※クライアント企業からの広告です。以下に耳より情報があります※",
    "",
)
_CSC_SECTIONS = (
    (
        "「ＣＳＣからの耳よりなお知らせ」<出会い編>",
        "",
        "新しい年が始まりました。今年こそ新しい仲間を見つけたい、",
        "そんなあなたにぴったりの趣味のコミュニティをご紹介します。",
        "",
    ),
    (
        "★趣味の仲間が見つかる「ホビーリンク」",
        "  旅行、写真、料理、音楽など、百を超えるテーマの掲示板があります。",
        "  同じ趣味を持つ全国の会員と、気軽にメッセージを交換できます。",
        "  登録は無料、メールアドレスだけで今すぐ始められます。",
        "",
    ),
    (
        "★毎週末はオフ会を開催",
        "  東京、大阪、名古屋、福岡の各地で、会員同士の交流会を開いています。",
        "  初めての方でも安心して参加できるよう、スタッフがご案内します。",
        "",
    ),
    (
        "★今なら登録特典つき",
        "  1月31日までにご登録の方には、プロフィール用の写真撮影を",
        "  無料でご利用いただけるクーポンを差し上げます。",
        "",
    ),
    (
        "▼詳しくはこちら",
        "  http://www.hobbylink.example.jp/csc/",
        "",
    ),
    (
        "※このお知らせの内容に関するお問い合わせは、広告主へ直接お願いします。",
        "",
    ),
    (
        "■□■　もうひとつの耳より情報　■□■",
        "",
        "★パソコン教室「はじめてのインターネット」",
        "  メールの送り方からホームページの作り方まで、少人数で丁寧に教えます。",
        "  平日の夜と土曜日のクラスがあり、お仕事帰りにも通えます。",
        "  今なら体験レッスンが無料です。お気軽にお申し込みください。",
        "",
    ),
    (
        "★受講生の声",
        "  「自分でデジカメの写真をメールで送れるようになりました」（60代男性）",
        "  「子どもと一緒にホームページを作っています」（40代女性）",
        "",
    ),
    (
        "▼お申し込み・お問い合わせ",
        "  http://www.pc-school.example.jp/csc/",
        "  電話：03-0000-0000（受付時間　平日10時から19時まで）",
        "",
    ),
    ("  ・会員情報の変更は、CSCのホームページから行えます。", ""),
    ("  ・携帯電話向けのサービスも準備中です。", ""),
    ("■今後のオフ会の予定",),
)
_CSC_FOOTER = (
    "■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□",
    "CSC (Cyber Space Community) http://www.csc.ne.jp/",
    "このメールは、CSCにご登録いただいた方にお送りしています。",
    "配信の停止をご希望の方は、adv@csc.ne.jp までご連絡ください。",
    "■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□■□",
)


_WEEKDAYS = "月火水木金土日"


def _back_numbers() -> list[tuple[str, ...]]:
    """One line per earlier weekly issue of the @IT newsletter, newest first."""
    day = datetime.date(2002, 1, 12)
    items: list[tuple[str, ...]] = []
    for _ in range(52):
        items.append(
            ("  %s号　http://www.atmarkit.co.jp/club/backnumber/%s.html"
             % (day.strftime("%Y/%m/%d"), day.strftime("%y%m%d")),)
        )
        day -= datetime.timedelta(days=7)
    return items


def _meetings() -> list[tuple[str, ...]]:
    """One line per planned CSC members' meeting, every Saturday and Sunday from late January."""
    cities = ("東京・渋谷", "大阪・梅田", "名古屋・栄", "福岡・天神", "札幌・大通", "仙台・青葉")
    day = datetime.date(2002, 1, 26)
    items: list[tuple[str, ...]] = []
    for index in range(52):
        items.append(
            ("  %d月%d日（%s）　%s会場　定員20名"
             % (day.month, day.day, _WEEKDAYS[day.weekday()], cities[index % len(cities)]),)
        )
        day += datetime.timedelta(days=1 if day.weekday() == 5 else 6)
    return items


def _jis_lines(lines: Iterable[str]) -> bytes:
    """Encode text lines in ISO-2022-JP, each ending in ASCII state and CRLF (RFC 1468)."""
    return b"".join(line.encode("iso2022_jp") + b"\r\n" for line in lines)


def _newsletter(
    header: Sequence[str],
    start: Sequence[str],
    sections: Sequence[Sequence[str]],
    footer: Sequence[str],
    size: int,
) -> bytes:
    """Build a message of exactly `size` octets: header, blank line, `start`, as many `sections`
    as fit (in order, skipping those that do not), ASCII rule lines for the rest, `footer`."""
    data = "\r\n".join(header).encode("ascii") + b"\r\n\r\n" + _jis_lines(start)
    tail = _jis_lines(footer)
    for section in sections:
        chunk = _jis_lines(section)
        if len(data) + len(chunk) + len(tail) + 2 <= size:
            data += chunk
    gap = size - len(data) - len(tail)
    if gap == 1 or gap < 0:
        raise AssertionError("newsletter text does not fit %d octets" % size)
    rules: list[str] = []
    while gap > 0:
        width = gap - 2 if gap <= 78 else 60
        rules.append("-" * width)
        gap -= width + 2
    data += _jis_lines(rules) + tail
    if len(data) != size:
        raise AssertionError("newsletter is %d octets, not %d" % (len(data), size))
    return data


MESSAGES = (
    _newsletter(
        _ATMARKIT_HEADER,
        _ATMARKIT_START,
        _ATMARKIT_SECTIONS + tuple(_back_numbers()),
        _ATMARKIT_FOOTER,
        5954,
    ),
    _newsletter(_CSC_HEADER, _CSC_START, _CSC_SECTIONS + tuple(_meetings()), _CSC_FOOTER, 4226),
)
# InterChange-style unique ids: the hex time of arrival and a serial number.
UIDS = ("3C4B82C800000001", "3C4BC6A100000002")

# The session: the seed's commands in the seed's order, with CAPA first (what clients send
# first; InterChange 3.62 predates it) and UIDL and RETR 2 added so that the recording holds
# both messages whole and their unique ids.
COMMANDS = ("CAPA", "USER hogehoge", "PASS fugafuga", "STAT", "LIST", "UIDL", "TOP 2 5", "RETR 1",
            "RETR 2", "DELE 1", "LIST", "RSET", "LIST", "QUIT")
MULTI_LINE = ("LIST", "UIDL", "TOP 2 5", "RETR 1", "RETR 2")
GREETING = "InterChange POP3 Server v3.62 Ready (X-INF-V1) " + fakeserver.OPERAMAIL_TIMESTAMP


def recording() -> str:
    """The transcript text of the session above against the rebuilt messages."""
    users = {"hogehoge": fakeserver.Maildrop("fugafuga", MESSAGES, uids=UIDS)}
    lines = [
        fakeserver.TRANSCRIPT_HEADER,
        "# The OperaMail session of the seed (InterChange POP3 3.62, 2002): user hogehoge, the",
        "# test password fugafuga; the two newsletters whole (the seed cut them short), written by",
        "# tools/operamail_recording.py. The operamail preset and FakeServer(replay=...) serve it.",
    ]
    server = fakeserver.FakeServer(users=users, greeting=GREETING)
    with server, socket.create_connection(server.start().address, timeout=5) as sock:
        reader = sock.makefile("rb")
        lines.append(fakeserver.transcript_line("S", reader.readline()))
        for command in COMMANDS:
            sock.sendall(command.encode() + b"\r\n")
            wire = fakeserver._redact_command(command.encode()) + b"\r\n"
            lines.append(fakeserver.transcript_line("C", wire))
            line = reader.readline()
            lines.append(fakeserver.transcript_line("S", line))
            if command in MULTI_LINE and line.startswith(b"+OK"):
                while line != b".\r\n":
                    line = reader.readline()
                    lines.append(fakeserver.transcript_line("S", line))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(recording())
