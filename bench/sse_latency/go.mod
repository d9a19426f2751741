module sselatency

go 1.19
